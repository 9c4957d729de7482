//! The embedded SQLite store. Statements both stores share are in [`crate::sql`].

use crate::sql::{self, corrupt, map_unique, timer};
use crate::{
    BoxSpan, Document, KeyRecord, NodeRow, Result, Store, StoreError, UsageFilter, UsageKey,
    UsageRow, UsageSum,
};
use async_trait::async_trait;
use berth_api::{BoxObject, Event, KeyObject, NodeObject, SessionObject, TriggerObject};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// What a committed write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: survives the server being killed or crashing (the
    /// kernel holds the written WAL); the newest transactions can be lost if the machine
    /// itself loses power. No fsync per commit, so event delivery stays fast.
    Crash,
    /// WAL with `synchronous=FULL`: every commit is fsynced before it is acknowledged.
    PowerLoss,
}

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Open (creating if needed) the database file and run migrations, with the default
    /// durability ([`Durability::Crash`]).
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        Self::open_with(path, Durability::Crash).await
    }

    pub async fn open_with(path: &Path, durability: Durability) -> Result<SqliteStore> {
        let url = format!("sqlite://{}", path.display());
        let opts = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Crash => SqliteSynchronous::Normal,
                Durability::PowerLoss => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    /// One JSON document by id from `boxes`, `sessions` or `triggers`, absent when it belongs
    /// to another tenant.
    async fn get_doc<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<T>> {
        let _t = timer("get");
        sqlx::query(&sql::get_doc(table))
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| sql::doc(&r, "doc"))
            .transpose()
    }

    /// Every document of `table`, a tenant's or all, oldest first.
    async fn list_docs<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        tenant: Option<&str>,
    ) -> Result<Vec<T>> {
        let rows = sqlx::query(&sql::list_docs(table))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| sql::doc(r, "doc")).collect()
    }

    /// Append to an event log table (`events` or `box_events`; names are ours, never input)
    /// within the transaction `tx`.
    async fn append_in(
        tx: &mut SqliteConnection,
        table: &str,
        owner: &str,
        events: &[Event],
    ) -> Result<()> {
        let _t = timer("append_events");
        let firsts = sql::batch_firsts(events)?;
        let insert =
            format!("INSERT INTO {table} ({owner}, seq, ts, kind, data) VALUES (?, ?, ?, ?, ?)");
        for e in events {
            let data = serde_json::to_string(&e.data).map_err(corrupt)?;
            sqlx::query(&insert)
                .bind(&e.session_id)
                .bind(e.seq)
                .bind(&e.ts)
                .bind(e.kind.as_str())
                .bind(data)
                .execute(&mut *tx)
                .await
                .map_err(map_unique)?;
        }
        // Gapless: the first of each log follows a row already there (checked after the
        // inserts, once the transaction holds the write lock, so no read-to-write upgrade can
        // fail).
        let prev = format!("SELECT COUNT(*) AS n FROM {table} WHERE {owner} = ? AND seq = ?");
        for (id, first) in firsts {
            let before: i64 = if first > 1 {
                sqlx::query(&prev)
                    .bind(id)
                    .bind(first - 1)
                    .fetch_one(&mut *tx)
                    .await?
                    .get("n")
            } else {
                i64::from(first == 1)
            };
            if before == 0 {
                return Err(StoreError::Conflict(format!(
                    "event {first} of {id} does not continue its log"
                )));
            }
        }
        Ok(())
    }

    async fn append_to(&self, table: &str, owner: &str, events: &[Event]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        Self::append_in(&mut tx, table, owner, events).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_session_in(tx: &mut SqliteConnection, s: &SessionObject) -> Result<()> {
        let _t = timer("put_session");
        let doc = serde_json::to_string(s).map_err(corrupt)?;
        let r = sqlx::query(sql::PUT_SESSION)
            .bind(&s.id)
            .bind(&s.tenant)
            .bind(&s.box_id)
            .bind(s.state.as_str())
            .bind(doc)
            .bind(&s.created_at)
            .bind(s.node.as_deref())
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Err(sql::session_held(&s.id));
        }
        Ok(())
    }

    async fn read_from(
        &self,
        table: &str,
        owner: &str,
        id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let _t = timer("read_events");
        let rows = sqlx::query(&sql::read_events(table, owner))
            .bind(id)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| sql::event(r, id)).collect()
    }

    async fn max_seq(&self, table: &str, owner: &str, id: &str) -> Result<i64> {
        Ok(sqlx::query(&sql::last_seq(table, owner))
            .bind(id)
            .fetch_one(&self.pool)
            .await?
            .get("n"))
    }

    /// The pool (for `store copy`).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Close the pool (tests use this to simulate an unavailable store).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<()> {
        // A write statement takes the database's write lock even when it changes nothing;
        // the transaction is rolled back (also if this future is dropped by a timeout).
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM ready_probe")
            .execute(&mut *tx)
            .await?;
        tx.rollback().await?;
        Ok(())
    }

    async fn ensure_tenant(&self, tenant: &str) -> Result<()> {
        sqlx::query("INSERT INTO tenants (name, created_at) VALUES (?, strftime('%Y-%m-%dT%H:%M:%SZ','now')) ON CONFLICT(name) DO NOTHING")
            .bind(tenant)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn insert_key(&self, key: &KeyObject, hash: &str) -> Result<()> {
        self.ensure_tenant(&key.tenant).await?;
        sqlx::query(sql::INSERT_KEY)
            .bind(&key.id)
            .bind(hash)
            .bind(&key.tenant)
            .bind(key.admin)
            .bind(&key.created_at)
            .execute(&self.pool)
            .await
            .map_err(map_unique)?;
        Ok(())
    }

    async fn find_key(&self, hash: &str) -> Result<Option<KeyRecord>> {
        let _t = timer("find_key");
        let row = sqlx::query(sql::FIND_KEY)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| sql::key_record(&r)))
    }

    async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<KeyObject>> {
        let rows = sqlx::query(sql::LIST_KEYS)
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(sql::key_object).collect())
    }

    async fn get_key(&self, tenant: &str, id: &str) -> Result<Option<KeyObject>> {
        let _t = timer("get_key");
        let row = sqlx::query(sql::GET_KEY)
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| sql::key_object(&r)))
    }

    async fn delete_key(&self, id: &str) -> Result<bool> {
        let r = sqlx::query(sql::DELETE_KEY)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn count_keys(&self) -> Result<i64> {
        Ok(sqlx::query(sql::COUNT_KEYS)
            .fetch_one(&self.pool)
            .await?
            .get("n"))
    }

    async fn put_box(&self, b: &BoxObject) -> Result<()> {
        let _t = timer("put_box");
        let doc = serde_json::to_string(b).map_err(corrupt)?;
        let r = sqlx::query(
            "INSERT INTO boxes (id, tenant, state, doc, created_at, node) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT(id) DO UPDATE SET state = excluded.state, doc = excluded.doc
             WHERE boxes.node IS excluded.node",
        )
        .bind(&b.id)
        .bind(&b.tenant)
        .bind(b.state.as_str())
        .bind(doc)
        .bind(&b.created_at)
        .bind(b.node.as_deref())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "box {} is held by another node",
                b.id
            )));
        }
        Ok(())
    }

    async fn get_box(&self, tenant: Option<&str>, id: &str) -> Result<Option<BoxObject>> {
        self.get_doc("boxes", tenant, id).await
    }

    async fn list_boxes(&self, tenant: Option<&str>) -> Result<Vec<BoxObject>> {
        self.list_docs("boxes", tenant).await
    }

    async fn put_session(&self, s: &SessionObject) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        Self::put_session_in(&mut conn, s).await
    }

    async fn commit_session(&self, s: &SessionObject, events: &[Event]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        Self::append_in(&mut tx, "events", "session_id", events).await?;
        Self::put_session_in(&mut tx, s).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_session(&self, tenant: Option<&str>, id: &str) -> Result<Option<SessionObject>> {
        self.get_doc("sessions", tenant, id).await
    }

    async fn list_sessions(
        &self,
        tenant: Option<&str>,
        box_id: Option<&str>,
    ) -> Result<Vec<SessionObject>> {
        let rows = sqlx::query(sql::LIST_SESSIONS)
            .bind(tenant)
            .bind(box_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| sql::doc(r, "doc")).collect()
    }

    async fn append_events(&self, events: &[Event]) -> Result<()> {
        self.append_to("events", "session_id", events).await
    }

    async fn events_after(&self, session_id: &str, after: i64, limit: i64) -> Result<Vec<Event>> {
        self.read_from("events", "session_id", session_id, after, limit)
            .await
    }

    async fn last_seq(&self, session_id: &str) -> Result<i64> {
        self.max_seq("events", "session_id", session_id).await
    }

    async fn append_box_events(&self, events: &[Event]) -> Result<()> {
        self.append_to("box_events", "box_id", events).await
    }

    async fn box_events_after(&self, box_id: &str, after: i64, limit: i64) -> Result<Vec<Event>> {
        self.read_from("box_events", "box_id", box_id, after, limit)
            .await
    }

    async fn last_box_seq(&self, box_id: &str) -> Result<i64> {
        self.max_seq("box_events", "box_id", box_id).await
    }

    async fn record_usage(&self, rows: &[UsageRow]) -> Result<()> {
        let _t = timer("record_usage");
        let mut tx = self.pool.begin().await?;
        // Multi-row INSERTs (13 parameters a row, well under SQLite's limit per statement),
        // in chunks of 64, 16, 4 and 1 rows so that four prepared statements serve any batch.
        // (The trigger of migration 0010 adds each row to `usage_hourly`.)
        let mut rest = rows;
        while !rest.is_empty() {
            let n = [64, 16, 4, 1]
                .into_iter()
                .find(|n| rest.len() >= *n)
                .unwrap_or(1);
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO usage (ts, ts_ms, tenant, box_id, session_id, model, status, input_tokens,
                 output_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens, cache_read_tokens, cost_usd) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&r.ts)
                    .push_bind(r.ts_ms)
                    .push_bind(&r.tenant)
                    .push_bind(&r.box_id)
                    .push_bind(&r.session_id)
                    .push_bind(&r.model)
                    .push_bind(r.status as i64)
                    .push_bind(r.input_tokens as i64)
                    .push_bind(r.output_tokens as i64)
                    .push_bind(r.cache_creation_5m_tokens as i64)
                    .push_bind(r.cache_creation_1h_tokens as i64)
                    .push_bind(r.cache_read_tokens as i64)
                    .push_bind(r.cost_usd);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn usage_sums(&self, key: UsageKey, f: &UsageFilter) -> Result<Vec<UsageSum>> {
        let _t = timer("usage_sums");
        let text = sql::usage_sums(key);
        let rows = sql::bind_usage(sqlx::query(&text), f)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(sql::usage_sum).collect())
    }

    async fn open_box_span(&self, span: &BoxSpan) -> Result<()> {
        sqlx::query(sql::OPEN_SPAN)
            .bind(&span.box_id)
            .bind(&span.tenant)
            .bind(span.start_ms)
            .bind(span.cpus)
            .bind(span.memory_mib as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn close_box_span(&self, box_id: &str, end_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE box_time SET end_ms = MAX(start_ms, ?1), seen_ms = MAX(start_ms, ?1)
             WHERE box_id = ?2 AND end_ms IS NULL",
        )
        .bind(end_ms)
        .bind(box_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mark_box_spans_seen(&self, now_ms: i64) -> Result<()> {
        sqlx::query("UPDATE box_time SET seen_ms = MAX(seen_ms, ?) WHERE end_ms IS NULL")
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn close_abandoned_box_spans(&self) -> Result<u64> {
        Ok(sqlx::query(sql::CLOSE_ABANDONED_SPANS)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn box_spans(
        &self,
        tenant: Option<&str>,
        box_id: Option<&str>,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> Result<Vec<BoxSpan>> {
        let rows = sqlx::query(sql::SPANS)
            .bind(tenant)
            .bind(box_id)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(sql::box_span).collect())
    }

    async fn set_tenant_budget(&self, tenant: &str, budget: Option<f64>) -> Result<()> {
        self.ensure_tenant(tenant).await?;
        sqlx::query(sql::SET_BUDGET)
            .bind(budget)
            .bind(tenant)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn tenant_budgets(&self) -> Result<Vec<(String, f64)>> {
        let rows = sqlx::query(sql::BUDGETS).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("name"), r.get("budget_usd_month")))
            .collect())
    }

    async fn tenant_budget(&self, tenant: &str) -> Result<Option<f64>> {
        Ok(sqlx::query(sql::BUDGET)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?
            .and_then(|r| r.get::<Option<f64>, _>("budget_usd_month")))
    }

    async fn put_trigger(&self, t: &TriggerObject, secret: &str) -> Result<()> {
        let doc = serde_json::to_string(t).map_err(corrupt)?;
        sqlx::query(sql::PUT_TRIGGER)
            .bind(&t.id)
            .bind(&t.tenant)
            .bind(doc)
            .bind(secret)
            .bind(&t.created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn update_trigger(&self, t: &TriggerObject) -> Result<()> {
        let doc = serde_json::to_string(t).map_err(corrupt)?;
        sqlx::query(sql::UPDATE_TRIGGER)
            .bind(doc)
            .bind(&t.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_trigger(
        &self,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<(TriggerObject, String)>> {
        let row = sqlx::query(sql::GET_TRIGGER)
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((sql::doc(&r, "doc")?, r.get::<String, _>("secret"))))
            .transpose()
    }

    async fn list_triggers(&self, tenant: Option<&str>) -> Result<Vec<TriggerObject>> {
        self.list_docs("triggers", tenant).await
    }

    async fn delete_trigger(&self, tenant: Option<&str>, id: &str) -> Result<bool> {
        let r = sqlx::query(sql::DELETE_TRIGGER)
            .bind(id)
            .bind(tenant)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn put_document(&self, doc: &Document, replace: bool) -> Result<()> {
        let body = serde_json::to_string(&doc.body).map_err(corrupt)?;
        let sql = if replace {
            "INSERT INTO documents (kind, tenant, id, version, body) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT(kind, tenant, id, version) DO UPDATE SET body = excluded.body"
        } else {
            "INSERT INTO documents (kind, tenant, id, version, body) VALUES (?, ?, ?, ?, ?)"
        };
        sqlx::query(sql)
            .bind(&doc.kind)
            .bind(&doc.tenant)
            .bind(&doc.id)
            .bind(doc.version)
            .bind(body)
            .execute(&self.pool)
            .await
            .map_err(map_unique)?;
        Ok(())
    }

    async fn advance_document(&self, doc: &Document, from: i64) -> Result<bool> {
        let body = serde_json::to_string(&doc.body).map_err(corrupt)?;
        let r = sqlx::query(
            "UPDATE documents SET version = ?1, body = ?2
             WHERE kind = ?3 AND tenant = ?4 AND id = ?5 AND version = ?6",
        )
        .bind(doc.version)
        .bind(body)
        .bind(&doc.kind)
        .bind(&doc.tenant)
        .bind(&doc.id)
        .bind(from)
        .execute(&self.pool)
        .await
        .map_err(map_unique)?;
        Ok(r.rows_affected() == 1)
    }

    async fn documents(&self, kind: &str, tenant: &str, id: Option<&str>) -> Result<Vec<Document>> {
        let rows = sqlx::query(sql::DOCUMENTS)
            .bind(kind)
            .bind(tenant)
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        sql::documents(&rows, kind, tenant)
    }

    async fn count_documents(&self, kind: &str, tenant: &str) -> Result<i64> {
        let _t = timer("count_documents");
        Ok(sqlx::query(sql::COUNT_DOCUMENTS)
            .bind(kind)
            .bind(tenant)
            .fetch_one(&self.pool)
            .await?
            .get("n"))
    }

    async fn delete_document(&self, kind: &str, tenant: &str, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM documents WHERE kind = ? AND tenant = ? AND id = ?")
            .bind(kind)
            .bind(tenant)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn latest_documents(
        &self,
        kind: &str,
        tenant: &str,
        after: Option<&str>,
        desc: bool,
        limit: i64,
    ) -> Result<Vec<Document>> {
        let text = if desc {
            sql::LATEST_DOCUMENTS_DESC
        } else {
            sql::LATEST_DOCUMENTS_ASC
        };
        let rows = sqlx::query(text)
            .bind(kind)
            .bind(tenant)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        sql::documents(&rows, kind, tenant)
    }

    async fn join_node(&self, node: &NodeObject, lease_ms: i64) -> Result<i64> {
        let _t = timer("join_node");
        let doc = serde_json::to_string(node).map_err(corrupt)?;
        let row = sqlx::query(sql::JOIN_NODE)
            .bind(&node.name)
            .bind(lease_ms)
            .bind(doc)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>("incarnation"))
    }

    async fn renew_node(&self, node: &NodeObject, incarnation: i64, lease_ms: i64) -> Result<bool> {
        let _t = timer("renew_node");
        let doc = serde_json::to_string(node).map_err(corrupt)?;
        let r = sqlx::query(sql::RENEW_NODE)
            .bind(lease_ms)
            .bind(doc)
            .bind(&node.name)
            .bind(incarnation)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRow>> {
        let _t = timer("list_nodes");
        let rows = sqlx::query(sql::LIST_NODES).fetch_all(&self.pool).await?;
        rows.iter().map(sql::node_row).collect()
    }

    async fn claim_lost_node(
        &self,
        name: &str,
        incarnation: i64,
        now_ms: i64,
        reason: &str,
    ) -> Result<bool> {
        let _t = timer("claim_lost_node");
        let r = sqlx::query(sql::CLAIM_LOST_NODE)
            .bind(reason)
            .bind(name)
            .bind(incarnation)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_node_state(&self, name: &str, state: berth_api::NodeState) -> Result<bool> {
        let r = sqlx::query(sql::SET_NODE_STATE)
            .bind(state.as_str())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn claim_box(&self, b: &BoxObject, from: Option<&str>) -> Result<bool> {
        let _t = timer("claim_box");
        let doc = serde_json::to_string(b).map_err(corrupt)?;
        let r = sqlx::query(
            "UPDATE boxes SET state = ?1, doc = ?2, node = ?3
             WHERE id = ?4 AND node IS ?5",
        )
        .bind(b.state.as_str())
        .bind(doc)
        .bind(b.node.as_deref())
        .bind(&b.id)
        .bind(from)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn claim_cron_fire(&self, id: &str, due_ms: i64) -> Result<bool> {
        let r = sqlx::query(sql::CLAIM_CRON_FIRE)
            .bind(due_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }
}

// (The `Store` contract itself is asserted on both stores by `tests/conformance.rs`.)
#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::*;

    fn event(s: &str, seq: i64) -> Event {
        Event {
            seq,
            session_id: s.into(),
            ts: "2026-01-01T00:00:00Z".into(),
            kind: EventKind::Stdout,
            data: serde_json::json!({"text": format!("line {seq}")}),
        }
    }

    #[tokio::test]
    async fn events_are_append_only_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("berth.db");
        {
            let st = SqliteStore::open(&path).await.expect("open");
            st.append_events(&[event("s1", 1), event("s1", 2), event("s2", 1)])
                .await
                .expect("append");
            assert!(matches!(
                st.append_events(&[event("s1", 2)]).await,
                Err(StoreError::Conflict(_))
            ));
            st.close().await;
        }
        let st = SqliteStore::open(&path).await.expect("reopen");
        let evs = st.events_after("s1", 0, 100).await.expect("read");
        assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(evs[1].data["text"], "line 2");
        assert_eq!(st.events_after("s1", 1, 100).await.expect("read").len(), 1);
        assert_eq!(st.last_seq("s1").await.expect("seq"), 2);
        assert_eq!(st.last_seq("nope").await.expect("seq"), 0);
    }
}
