//! What both stores share: statements that are the same SQL on SQLite and PostgreSQL, and the
//! decoding of their rows.
//!
//! Shared statements are written once with SQLite's numbered placeholders (`?1`, `?2`, …, each
//! number bound once, in order, by the caller); the PostgreSQL store reads them through
//! [`pg!`] (a constant) or [`dollars`] (text built at run time), which turn them into `$1`,
//! `$2`. Statements whose dialects differ (upserts, `GREATEST`/`MAX`, array inserts, clocks)
//! stay in each store.

use crate::{BoxSpan, StoreError, UsageFilter, UsageKey, UsageSum};
use berth_api::{Event, KeyObject};
use sqlx::Row;

/// Records how long a store operation took (`berth_store_op_seconds{op}`) when dropped.
pub(crate) struct OpTimer(&'static str, std::time::Instant);

pub(crate) fn timer(op: &'static str) -> OpTimer {
    OpTimer(op, std::time::Instant::now())
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        metrics::histogram!("berth_store_op_seconds", "op" => self.0)
            .record(self.1.elapsed().as_secs_f64());
    }
}

pub(crate) fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// A unique-key violation is a [`StoreError::Conflict`].
pub(crate) fn map_unique(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            StoreError::Conflict(d.message().to_string())
        }
        _ => StoreError::Db(e),
    }
}

/// `sql` with `?N` placeholders written `$N` (PostgreSQL's form). Our statements hold no `?`
/// elsewhere (no string literals with one, no JSON operators).
pub(crate) fn dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// A shared constant statement in PostgreSQL's form, converted once per call site.
macro_rules! pg {
    ($sql:expr) => {{
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        SQL.get_or_init(|| $crate::sql::dollars($sql)).as_str()
    }};
}
pub(crate) use pg;

/// A result row of either store, read by column name. A column of another type than asked is
/// a bug in our own statements (they are fixed text), hence `get`'s panic, as sqlx's own.
pub(crate) trait StoreRow {
    fn text(&self, c: &str) -> String;
    fn int(&self, c: &str) -> i64;
    fn opt_int(&self, c: &str) -> Option<i64>;
    fn opt_text(&self, c: &str) -> Option<String>;
    fn real(&self, c: &str) -> f64;
    fn opt_real(&self, c: &str) -> Option<f64>;
    fn flag(&self, c: &str) -> bool;
}

macro_rules! store_row {
    ($row:ty) => {
        impl StoreRow for $row {
            fn text(&self, c: &str) -> String {
                self.get(c)
            }
            fn int(&self, c: &str) -> i64 {
                self.get(c)
            }
            fn opt_int(&self, c: &str) -> Option<i64> {
                self.get(c)
            }
            fn opt_text(&self, c: &str) -> Option<String> {
                self.get(c)
            }
            fn real(&self, c: &str) -> f64 {
                self.get(c)
            }
            fn opt_real(&self, c: &str) -> Option<f64> {
                self.get(c)
            }
            fn flag(&self, c: &str) -> bool {
                self.get(c)
            }
        }
    };
}
store_row!(sqlx::sqlite::SqliteRow);
store_row!(sqlx::postgres::PgRow);

/// A JSON document column.
pub(crate) fn doc<T: serde::de::DeserializeOwned>(r: &impl StoreRow, c: &str) -> crate::Result<T> {
    serde_json::from_str(&r.text(c)).map_err(corrupt)
}

/// Within a batch, each event must follow the one before of its log: the first seq of each log
/// in the batch, or a [`StoreError::Conflict`]. (Whether that first one follows the stored log
/// is each store's check, in its transaction.)
pub(crate) fn batch_firsts(events: &[Event]) -> crate::Result<Vec<(&str, i64)>> {
    let mut next: std::collections::HashMap<&str, i64> = Default::default();
    let mut firsts = Vec::new();
    for e in events {
        match next.get(e.session_id.as_str()) {
            Some(n) if *n != e.seq => {
                return Err(StoreError::Conflict(format!(
                    "event {} of {} does not continue its log (next is {n})",
                    e.seq, e.session_id
                )))
            }
            Some(_) => {}
            None => firsts.push((e.session_id.as_str(), e.seq)),
        }
        next.insert(&e.session_id, e.seq + 1);
    }
    Ok(firsts)
}

/// An event of a log read by [`read_events`].
pub(crate) fn event(r: &impl StoreRow, owner_id: &str) -> crate::Result<Event> {
    Ok(Event {
        seq: r.int("seq"),
        session_id: owner_id.to_string(),
        ts: r.text("ts"),
        kind: r.text("kind").into(),
        data: doc(r, "data")?,
    })
}

// Keys.
pub(crate) const INSERT_KEY: &str =
    "INSERT INTO api_keys (id, hash, tenant, admin, created_at) VALUES (?1, ?2, ?3, ?4, ?5)";
pub(crate) const FIND_KEY: &str = "SELECT id, tenant, admin FROM api_keys WHERE hash = ?1";
pub(crate) const LIST_KEYS: &str = "SELECT id, tenant, admin, created_at FROM api_keys
     WHERE (?1 IS NULL OR tenant = ?1) ORDER BY created_at, id";
/// One key by id within its tenant (`id` is the primary key: one row at most).
pub(crate) const GET_KEY: &str = "SELECT id, tenant, admin, created_at FROM api_keys
     WHERE id = ?1 AND tenant = ?2";
pub(crate) const DELETE_KEY: &str = "DELETE FROM api_keys WHERE id = ?1";
pub(crate) const COUNT_KEYS: &str = "SELECT COUNT(*) AS n FROM api_keys";

pub(crate) fn key_record(r: &impl StoreRow) -> crate::KeyRecord {
    crate::KeyRecord {
        id: r.text("id"),
        tenant: r.text("tenant"),
        admin: r.flag("admin"),
    }
}

pub(crate) fn key_object(r: &impl StoreRow) -> KeyObject {
    KeyObject {
        id: r.text("id"),
        key: None,
        tenant: r.text("tenant"),
        admin: r.flag("admin"),
        created_at: r.text("created_at"),
    }
}

// Versioned documents (the Managed Agents API's).
/// Rows (every version) of a tenant's documents of one kind: an index-only count on the
/// (kind, tenant, id, version) key, not a read of the bodies.
pub(crate) const COUNT_DOCUMENTS: &str =
    "SELECT COUNT(*) AS n FROM documents WHERE kind = ?1 AND tenant = ?2";
/// Every version of a tenant's documents of one kind (of one id when `?3` is given), in
/// first-write order.
pub(crate) const DOCUMENTS: &str = "SELECT id, version, body FROM documents
     WHERE kind = ?1 AND tenant = ?2 AND (?3 IS NULL OR id = ?3) ORDER BY seq";
/// A keyset page of the latest version of each document, highest id first, below `?3`. Both
/// directions are spelled out, so each walks the (kind, tenant, id, version) index.
pub(crate) const LATEST_DOCUMENTS_DESC: &str = "SELECT d.id, d.version, d.body FROM documents d
     WHERE d.kind = ?1 AND d.tenant = ?2 AND (?3 IS NULL OR d.id < ?3)
       AND d.version = (SELECT MAX(m.version) FROM documents m
                        WHERE m.kind = d.kind AND m.tenant = d.tenant AND m.id = d.id)
     ORDER BY d.id DESC LIMIT ?4";
/// [`LATEST_DOCUMENTS_DESC`] in ascending id order, past `?3`.
pub(crate) const LATEST_DOCUMENTS_ASC: &str = "SELECT d.id, d.version, d.body FROM documents d
     WHERE d.kind = ?1 AND d.tenant = ?2 AND (?3 IS NULL OR d.id > ?3)
       AND d.version = (SELECT MAX(m.version) FROM documents m
                        WHERE m.kind = d.kind AND m.tenant = d.tenant AND m.id = d.id)
     ORDER BY d.id ASC LIMIT ?4";

/// The rows of [`DOCUMENTS`] or a latest-documents page, as documents of `kind` in `tenant`.
pub(crate) fn documents(
    rows: &[impl StoreRow],
    kind: &str,
    tenant: &str,
) -> crate::Result<Vec<crate::Document>> {
    rows.iter()
        .map(|r| {
            Ok(crate::Document {
                kind: kind.to_string(),
                tenant: tenant.to_string(),
                id: r.text("id"),
                version: r.int("version"),
                body: doc(r, "body")?,
            })
        })
        .collect()
}

// Tenants' budgets.
pub(crate) const SET_BUDGET: &str = "UPDATE tenants SET budget_usd_month = ?1 WHERE name = ?2";
pub(crate) const BUDGETS: &str =
    "SELECT name, budget_usd_month FROM tenants WHERE budget_usd_month IS NOT NULL";
pub(crate) const BUDGET: &str = "SELECT budget_usd_month FROM tenants WHERE name = ?1";

// Documents by id (boxes, sessions, triggers: table names are ours, never input).
pub(crate) fn get_doc(table: &str) -> String {
    format!("SELECT doc FROM {table} WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2)")
}
pub(crate) fn list_docs(table: &str) -> String {
    format!("SELECT doc FROM {table} WHERE (?1 IS NULL OR tenant = ?1) ORDER BY created_at, id")
}
/// Fenced like a box's record: an existing session is written by the node named in its row,
/// or by the node holding its box now (the one that took the box over: a restore elsewhere,
/// or the node that settled a lost node's boxes and cleared their holder). A cut-off node
/// that comes back is neither, so its late writes change nothing (a `Conflict`).
pub(crate) const PUT_SESSION: &str =
    "INSERT INTO sessions (id, tenant, box_id, state, doc, created_at, node)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
     ON CONFLICT (id) DO UPDATE SET state = excluded.state, doc = excluded.doc, node = excluded.node
     WHERE sessions.node IS NOT DISTINCT FROM excluded.node
        OR excluded.node IS NOT DISTINCT FROM (SELECT b.node FROM boxes b WHERE b.id = excluded.box_id)";

/// The refusal of a fenced session write.
pub(crate) fn session_held(id: &str) -> StoreError {
    StoreError::Conflict(format!("session {id} is held by another node"))
}
pub(crate) const LIST_SESSIONS: &str = "SELECT doc FROM sessions
     WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR box_id = ?2) ORDER BY created_at, id";

// Event logs (`events` by `session_id`, `box_events` by `box_id`).
pub(crate) fn read_events(table: &str, owner: &str) -> String {
    format!(
        "SELECT seq, ts, kind, data FROM {table} WHERE {owner} = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
    )
}
pub(crate) fn last_seq(table: &str, owner: &str) -> String {
    format!("SELECT COALESCE(MAX(seq), 0) AS n FROM {table} WHERE {owner} = ?1")
}

// Triggers (the secret beside the document).
pub(crate) const PUT_TRIGGER: &str =
    "INSERT INTO triggers (id, tenant, doc, secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, secret = excluded.secret";
pub(crate) const UPDATE_TRIGGER: &str = "UPDATE triggers SET doc = ?1 WHERE id = ?2";
pub(crate) const GET_TRIGGER: &str =
    "SELECT doc, secret FROM triggers WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2)";
pub(crate) const DELETE_TRIGGER: &str =
    "DELETE FROM triggers WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2)";

// Container time.
pub(crate) const OPEN_SPAN: &str =
    "INSERT INTO box_time (box_id, tenant, start_ms, end_ms, seen_ms, cpus, memory_mib)
     VALUES (?1, ?2, ?3, NULL, ?3, ?4, ?5)";
pub(crate) const CLOSE_ABANDONED_SPANS: &str =
    "UPDATE box_time SET end_ms = seen_ms WHERE end_ms IS NULL";
pub(crate) const SPANS: &str =
    "SELECT box_id, tenant, start_ms, end_ms, cpus, memory_mib FROM box_time
     WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR box_id = ?2)
     AND (?3 IS NULL OR end_ms IS NULL OR end_ms > ?3) AND (?4 IS NULL OR start_ms < ?4)
     ORDER BY box_id, start_ms";

pub(crate) fn box_span(r: &impl StoreRow) -> BoxSpan {
    BoxSpan {
        box_id: r.text("box_id"),
        tenant: r.text("tenant"),
        start_ms: r.int("start_ms"),
        end_ms: r.opt_int("end_ms"),
        cpus: r.real("cpus"),
        memory_mib: r.int("memory_mib").max(0) as u64,
    }
}

/// Milliseconds in the hours `usage_hourly` sums by.
const HOUR_MS: i64 = 3_600_000;

/// How `usage_sums` reads a window `[from, to)`: its whole hours from `usage_hourly`, and the
/// partial hours before and after them from `usage` (each a `[start, end)` range; an empty one
/// is `(0, 0)`). Unbounded ends are `i64::MIN` / `i64::MAX`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub hours: (i64, i64),
    pub head: (i64, i64),
    pub tail: (i64, i64),
}

pub(crate) fn window(from: Option<i64>, to: Option<i64>) -> Window {
    let from = from.unwrap_or(i64::MIN);
    let to = to.unwrap_or(i64::MAX);
    let first_hour = match from {
        i64::MIN => i64::MIN,
        f if f.rem_euclid(HOUR_MS) == 0 => f,
        f => (f.div_euclid(HOUR_MS) * HOUR_MS).saturating_add(HOUR_MS),
    };
    let end_hour = match to {
        i64::MAX => i64::MAX,
        t => t.div_euclid(HOUR_MS) * HOUR_MS,
    };
    if first_hour >= end_hour {
        // Not one whole hour inside: the rows themselves.
        Window {
            hours: (0, 0),
            head: (from, to.max(from)),
            tail: (0, 0),
        }
    } else {
        Window {
            hours: (first_hour, end_hour),
            head: (from, first_hour),
            tail: (end_hour, to),
        }
    }
}

/// Usage summed per (`key`, model) within a [`Window`]: whole hours from the rollup, the edges
/// from the rows. Binds: ?1 tenant, ?2 session, ?3–?4 hours, ?5–?6 head, ?7–?8 tail
/// ([`bind_usage`]'s order).
pub(crate) fn usage_sums(key: UsageKey) -> String {
    let col = match key {
        UsageKey::Session => "session_id",
        UsageKey::Box => "box_id",
        UsageKey::Tenant => "tenant",
        UsageKey::Model => "model",
    };
    let rows = |from: &str, to: &str| {
        format!(
            "SELECT {col} AS k, model, 1 AS n, input_tokens AS i, output_tokens AS o,
             cache_creation_5m_tokens AS c5, cache_creation_1h_tokens AS c1,
             cache_read_tokens AS cr, cost_usd AS usd
             FROM usage WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR session_id = ?2)
             AND ts_ms >= {from} AND ts_ms < {to}"
        )
    };
    // SUM of BIGINT is NUMERIC in PostgreSQL (the cast makes it BIGINT; SQLite's is INTEGER).
    format!(
        "SELECT k, model, CAST(SUM(n) AS BIGINT) AS n, CAST(SUM(i) AS BIGINT) AS i,
         CAST(SUM(o) AS BIGINT) AS o, CAST(SUM(c5) AS BIGINT) AS c5,
         CAST(SUM(c1) AS BIGINT) AS c1, CAST(SUM(cr) AS BIGINT) AS cr, SUM(usd) AS usd
         FROM (
             SELECT {col} AS k, model, requests AS n, input_tokens AS i, output_tokens AS o,
             cache_creation_5m_tokens AS c5, cache_creation_1h_tokens AS c1,
             cache_read_tokens AS cr, cost_usd AS usd
             FROM usage_hourly WHERE (?1 IS NULL OR tenant = ?1)
             AND (?2 IS NULL OR session_id = ?2) AND hour_ms >= ?3 AND hour_ms < ?4
             UNION ALL {}
             UNION ALL {}
         ) u GROUP BY k, model ORDER BY k, model",
        rows("?5", "?6"),
        rows("?7", "?8"),
    )
}

/// Bind [`usage_sums`]'s parameters, in order.
pub(crate) fn bind_usage<'q, DB: sqlx::Database>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    f: &'q UsageFilter,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let w = window(f.from_ms, f.to_ms);
    q.bind(f.tenant.as_deref())
        .bind(f.session_id.as_deref())
        .bind(w.hours.0)
        .bind(w.hours.1)
        .bind(w.head.0)
        .bind(w.head.1)
        .bind(w.tail.0)
        .bind(w.tail.1)
}

pub(crate) fn usage_sum(r: &impl StoreRow) -> UsageSum {
    let n = |c: &str| r.opt_int(c).unwrap_or(0).max(0) as u64;
    UsageSum {
        key: r.text("k"),
        model: r.text("model"),
        requests: n("n"),
        input_tokens: n("i"),
        output_tokens: n("o"),
        cache_creation_5m_tokens: n("c5"),
        cache_creation_1h_tokens: n("c1"),
        cache_read_tokens: n("cr"),
        cost_usd: r.opt_real("usd").unwrap_or(0.0),
    }
}

// Nodes (the cluster): a lease or a claim is one conditional UPDATE, so exactly one caller wins.

/// A node (re)joins: a new incarnation; a draining node stays draining.
pub(crate) const JOIN_NODE: &str =
    "INSERT INTO nodes (name, state, incarnation, lease_ms, reason, doc) VALUES (?1, 'active', 1, ?2, NULL, ?3)
     ON CONFLICT (name) DO UPDATE SET incarnation = nodes.incarnation + 1,
       state = CASE WHEN nodes.state = 'draining' THEN 'draining' ELSE 'active' END,
       lease_ms = excluded.lease_ms, reason = NULL, doc = excluded.doc
     RETURNING incarnation";
pub(crate) const RENEW_NODE: &str = "UPDATE nodes SET lease_ms = ?1, doc = ?2
     WHERE name = ?3 AND incarnation = ?4 AND state <> 'lost'";
pub(crate) const LIST_NODES: &str =
    "SELECT name, state, incarnation, lease_ms, reason, doc FROM nodes ORDER BY name";
pub(crate) const CLAIM_LOST_NODE: &str = "UPDATE nodes SET state = 'lost', reason = ?1
     WHERE name = ?2 AND incarnation = ?3 AND state <> 'lost' AND lease_ms < ?4";
pub(crate) const SET_NODE_STATE: &str =
    "UPDATE nodes SET state = ?1, reason = NULL WHERE name = ?2 AND state <> 'lost'";
pub(crate) const CLAIM_CRON_FIRE: &str = "UPDATE triggers SET cron_fired_ms = ?1
     WHERE id = ?2 AND (cron_fired_ms IS NULL OR cron_fired_ms < ?1)";

/// A row of [`LIST_NODES`]: the document, with the columns the store owns laid over it.
pub(crate) fn node_row(r: &impl StoreRow) -> crate::Result<crate::NodeRow> {
    let mut node: berth_api::NodeObject = doc(r, "doc")?;
    let state = r.text("state");
    node.state = berth_api::NodeState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("node state {state:?}")))?;
    node.incarnation = r.int("incarnation");
    node.state_reason = r.opt_text("reason");
    Ok(crate::NodeRow {
        node,
        lease_ms: r.int("lease_ms"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars() {
        assert_eq!(
            dollars("a = ?1 AND (?12 IS NULL OR b = ?12) AND c = '?'"),
            "a = $1 AND ($12 IS NULL OR b = $12) AND c = '?'"
        );
    }

    #[test]
    fn a_window_is_whole_hours_and_its_edges() {
        let h = HOUR_MS;
        assert_eq!(
            window(None, None),
            Window {
                hours: (i64::MIN, i64::MAX),
                head: (i64::MIN, i64::MIN),
                tail: (i64::MAX, i64::MAX)
            }
        );
        assert_eq!(
            window(Some(h + 5), Some(4 * h + 7)),
            Window {
                hours: (2 * h, 4 * h),
                head: (h + 5, 2 * h),
                tail: (4 * h, 4 * h + 7)
            }
        );
        assert_eq!(
            window(Some(2 * h), Some(3 * h)),
            Window {
                hours: (2 * h, 3 * h),
                head: (2 * h, 2 * h),
                tail: (3 * h, 3 * h)
            }
        );
        // Within one hour, or across one boundary without a whole hour: rows only.
        assert_eq!(
            window(Some(h + 1), Some(2 * h + 1)),
            Window {
                hours: (0, 0),
                head: (h + 1, 2 * h + 1),
                tail: (0, 0)
            }
        );
        assert_eq!(window(Some(-h - 1), Some(-1)).hours, (0, 0));
        assert_eq!(window(Some(-2 * h - 1), Some(1)).hours, (-2 * h, 0));
        assert_eq!(window(Some(5), Some(3)).head, (5, 5), "empty, not reversed");
    }
}
