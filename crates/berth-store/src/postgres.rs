//! The PostgreSQL store: the same schema and semantics as [`crate::sqlite`], shared by every
//! server process that points at the same database.
//!
//! - Durability is PostgreSQL's: a commit is acknowledged after its WAL is flushed
//!   (`synchronous_commit` as the database is configured), so `Durability` has no say here.
//! - Event logs stay gapless with several writers: a batch must continue its log exactly
//!   (checked in the appending transaction; a concurrent batch with the same seqs loses on the
//!   primary key), else [`StoreError::Conflict`].
//! - Every committed session-event batch sends `NOTIFY berth_events, '<session id>'` in its own
//!   transaction (delivered on commit only). One `LISTEN` connection per process fans these out
//!   to [`Store::watch_session`] receivers; after that connection is lost and re-established,
//!   every receiver is woken once, since notifications sent in the gap are gone.
//! - A restarted PostgreSQL is reconnected to: pooled connections are tested before use and
//!   replaced, the listener reconnects with a backoff.
//!
//! Statements both stores share are in [`crate::sql`] (read here in PostgreSQL's `$n` form).

use crate::sql::{self, corrupt, dollars, map_unique, pg, timer};
use crate::{
    BoxSpan, Document, KeyRecord, NodeRow, Result, Store, StoreError, UsageFilter, UsageKey,
    UsageRow, UsageSum,
};
use async_trait::async_trait;
use berth_api::{BoxObject, Event, KeyObject, NodeObject, SessionObject, TriggerObject};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Row};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The channel committed session events are announced on.
const CHANNEL: &str = "berth_events";

/// Per-session wake-ups for committed events, shared by the listener task and subscribers.
#[derive(Default)]
struct Watchers {
    by_session: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Watchers {
    fn subscribe(&self, session_id: &str) -> watch::Receiver<u64> {
        let mut m = self.by_session.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, tx| tx.receiver_count() > 0);
        m.entry(session_id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn wake(&self, session_id: &str) {
        let m = self.by_session.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = m.get(session_id) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wake_all(&self) {
        let m = self.by_session.lock().unwrap_or_else(|p| p.into_inner());
        for tx in m.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

pub struct PostgresStore {
    pool: PgPool,
    watchers: Arc<Watchers>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Keep one `LISTEN` connection and turn notifications into wake-ups, reconnecting (and waking
/// everyone, for what the gap hid) whenever the connection is lost.
async fn listen(pool: PgPool, watchers: Arc<Watchers>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut l = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "event listener: connecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if let Err(e) = l.listen(CHANNEL).await {
            tracing::debug!(error = %e, "event listener: LISTEN");
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(50);
        metrics::counter!("berth_store_listener_connects_total").increment(1);
        watchers.wake_all();
        loop {
            match l.try_recv().await {
                Ok(Some(n)) => watchers.wake(n.payload()),
                Ok(None) | Err(_) => {
                    tracing::warn!("event listener: connection to PostgreSQL lost, reconnecting");
                    break;
                }
            }
        }
    }
}

impl PostgresStore {
    /// Connect to `url` (`postgres://…`) and run migrations (concurrent servers starting
    /// together serialise on the migrator's advisory lock).
    pub async fn open(url: &str) -> Result<PostgresStore> {
        let opts = PgConnectOptions::from_str(url)?.application_name("berth");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            // A connection left from before a PostgreSQL restart is found dead and replaced.
            .test_before_acquire(true)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let watchers = Arc::new(Watchers::default());
        let listener = tokio::spawn(listen(pool.clone(), watchers.clone()));
        Ok(PostgresStore {
            pool,
            watchers,
            listener,
        })
    }

    /// The pool (for `store copy` and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Close the pool (tests use this to simulate an unavailable store).
    pub async fn close(&self) {
        self.listener.abort();
        self.pool.close().await;
    }

    async fn get_doc<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<T>> {
        let _t = timer("get");
        sqlx::query(&dollars(&sql::get_doc(table)))
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| sql::doc(&r, "doc"))
            .transpose()
    }

    async fn list_docs<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        tenant: Option<&str>,
    ) -> Result<Vec<T>> {
        let rows = sqlx::query(&dollars(&sql::list_docs(table)))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| sql::doc(r, "doc")).collect()
    }

    /// Append to `events` or `box_events` (names are ours, never input) within the transaction
    /// `tx`; `notify` announces the batch's sessions when it commits.
    async fn append_in(
        tx: &mut PgConnection,
        table: &str,
        owner: &str,
        events: &[Event],
        notify: bool,
    ) -> Result<()> {
        let _t = timer("append_events");
        let firsts = sql::batch_firsts(events)?;
        // Gapless: the first of each log follows what is there (the primary key settles a
        // concurrent batch with the same seqs).
        let last_sql = dollars(&sql::last_seq(table, owner));
        for (id, first) in &firsts {
            let last: i64 = sqlx::query(&last_sql)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .get("n");
            if *first != last + 1 {
                return Err(StoreError::Conflict(format!(
                    "event {first} of {id} does not continue its log (next is {})",
                    last + 1
                )));
            }
        }
        let mut ids = Vec::with_capacity(events.len());
        let mut seqs = Vec::with_capacity(events.len());
        let mut tss = Vec::with_capacity(events.len());
        let mut kinds = Vec::with_capacity(events.len());
        let mut datas = Vec::with_capacity(events.len());
        for e in events {
            ids.push(e.session_id.as_str());
            seqs.push(e.seq);
            tss.push(e.ts.as_str());
            kinds.push(e.kind.as_str());
            datas.push(serde_json::to_string(&e.data).map_err(corrupt)?);
        }
        let insert = format!(
            "INSERT INTO {table} ({owner}, seq, ts, kind, data)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[])"
        );
        sqlx::query(&insert)
            .bind(&ids)
            .bind(&seqs)
            .bind(&tss)
            .bind(&kinds)
            .bind(&datas)
            .execute(&mut *tx)
            .await
            .map_err(map_unique)?;
        if notify {
            for (id, _) in firsts {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        Ok(())
    }

    async fn append_to(
        &self,
        table: &str,
        owner: &str,
        events: &[Event],
        notify: bool,
    ) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        Self::append_in(&mut tx, table, owner, events, notify).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_session_in(tx: &mut PgConnection, s: &SessionObject) -> Result<()> {
        let _t = timer("put_session");
        let doc = serde_json::to_string(s).map_err(corrupt)?;
        let r = sqlx::query(pg!(sql::PUT_SESSION))
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
        let rows = sqlx::query(&dollars(&sql::read_events(table, owner)))
            .bind(id)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| sql::event(r, id)).collect()
    }

    async fn max_seq(&self, table: &str, owner: &str, id: &str) -> Result<i64> {
        Ok(sqlx::query(&dollars(&sql::last_seq(table, owner)))
            .bind(id)
            .fetch_one(&self.pool)
            .await?
            .get("n"))
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<()> {
        let _t = timer("ping");
        // A write statement proves the database takes writes (not a read-only standby); the
        // transaction is rolled back (also if this future is dropped by a timeout).
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM ready_probe")
            .execute(&mut *tx)
            .await?;
        tx.rollback().await?;
        Ok(())
    }

    fn watch_session(&self, session_id: &str) -> Option<watch::Receiver<u64>> {
        Some(self.watchers.subscribe(session_id))
    }

    async fn ensure_tenant(&self, tenant: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenants (name, created_at)
             VALUES ($1, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(tenant)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_key(&self, key: &KeyObject, hash: &str) -> Result<()> {
        self.ensure_tenant(&key.tenant).await?;
        sqlx::query(pg!(sql::INSERT_KEY))
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
        let row = sqlx::query(pg!(sql::FIND_KEY))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| sql::key_record(&r)))
    }

    async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<KeyObject>> {
        let rows = sqlx::query(pg!(sql::LIST_KEYS))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(sql::key_object).collect())
    }

    async fn get_key(&self, tenant: &str, id: &str) -> Result<Option<KeyObject>> {
        let _t = timer("get_key");
        let row = sqlx::query(pg!(sql::GET_KEY))
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| sql::key_object(&r)))
    }

    async fn delete_key(&self, id: &str) -> Result<bool> {
        let r = sqlx::query(pg!(sql::DELETE_KEY))
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
            "INSERT INTO boxes (id, tenant, state, doc, created_at, node) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, doc = excluded.doc
             WHERE boxes.node IS NOT DISTINCT FROM excluded.node",
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
        if !events.is_empty() {
            Self::append_in(&mut tx, "events", "session_id", events, true).await?;
        }
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
        let rows = sqlx::query(pg!(sql::LIST_SESSIONS))
            .bind(tenant)
            .bind(box_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| sql::doc(r, "doc")).collect()
    }

    async fn append_events(&self, events: &[Event]) -> Result<()> {
        self.append_to("events", "session_id", events, true).await
    }

    async fn events_after(&self, session_id: &str, after: i64, limit: i64) -> Result<Vec<Event>> {
        self.read_from("events", "session_id", session_id, after, limit)
            .await
    }

    async fn last_seq(&self, session_id: &str) -> Result<i64> {
        self.max_seq("events", "session_id", session_id).await
    }

    async fn set_tenant_budget(&self, tenant: &str, budget: Option<f64>) -> Result<()> {
        self.ensure_tenant(tenant).await?;
        sqlx::query(pg!(sql::SET_BUDGET))
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
        Ok(sqlx::query(pg!(sql::BUDGET))
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await?
            .and_then(|r| r.get::<Option<f64>, _>("budget_usd_month")))
    }

    async fn append_box_events(&self, events: &[Event]) -> Result<()> {
        self.append_to("box_events", "box_id", events, false).await
    }

    async fn box_events_after(&self, box_id: &str, after: i64, limit: i64) -> Result<Vec<Event>> {
        self.read_from("box_events", "box_id", box_id, after, limit)
            .await
    }

    async fn last_box_seq(&self, box_id: &str) -> Result<i64> {
        self.max_seq("box_events", "box_id", box_id).await
    }

    async fn put_trigger(&self, t: &TriggerObject, secret: &str) -> Result<()> {
        let doc = serde_json::to_string(t).map_err(corrupt)?;
        sqlx::query(pg!(sql::PUT_TRIGGER))
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
        sqlx::query(pg!(sql::UPDATE_TRIGGER))
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
        let row = sqlx::query(pg!(sql::GET_TRIGGER))
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
        let r = sqlx::query(pg!(sql::DELETE_TRIGGER))
            .bind(id)
            .bind(tenant)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn put_document(&self, doc: &Document, replace: bool) -> Result<()> {
        let _t = timer("put_document");
        let body = serde_json::to_string(&doc.body).map_err(corrupt)?;
        let sql = if replace {
            "INSERT INTO documents (kind, tenant, id, version, body) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (kind, tenant, id, version) DO UPDATE SET body = excluded.body"
        } else {
            "INSERT INTO documents (kind, tenant, id, version, body) VALUES ($1, $2, $3, $4, $5)"
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
        let _t = timer("advance_document");
        let body = serde_json::to_string(&doc.body).map_err(corrupt)?;
        let r = sqlx::query(
            "UPDATE documents SET version = $1, body = $2
             WHERE kind = $3 AND tenant = $4 AND id = $5 AND version = $6",
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
        let _t = timer("documents");
        let rows = sqlx::query(pg!(sql::DOCUMENTS))
            .bind(kind)
            .bind(tenant)
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        sql::documents(&rows, kind, tenant)
    }

    async fn count_documents(&self, kind: &str, tenant: &str) -> Result<i64> {
        let _t = timer("count_documents");
        Ok(sqlx::query(pg!(sql::COUNT_DOCUMENTS))
            .bind(kind)
            .bind(tenant)
            .fetch_one(&self.pool)
            .await?
            .get("n"))
    }

    async fn delete_document(&self, kind: &str, tenant: &str, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM documents WHERE kind = $1 AND tenant = $2 AND id = $3")
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
        let _t = timer("latest_documents");
        let text = if desc {
            pg!(sql::LATEST_DOCUMENTS_DESC)
        } else {
            pg!(sql::LATEST_DOCUMENTS_ASC)
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

    async fn record_usage(&self, rows: &[UsageRow]) -> Result<()> {
        let _t = timer("record_usage");
        if rows.is_empty() {
            return Ok(());
        }
        // One statement per batch (a group commit): the columns as arrays, unnested.
        let mut ts = Vec::with_capacity(rows.len());
        let mut ts_ms = Vec::with_capacity(rows.len());
        let mut tenant = Vec::with_capacity(rows.len());
        let mut box_id = Vec::with_capacity(rows.len());
        let mut session_id = Vec::with_capacity(rows.len());
        let mut model = Vec::with_capacity(rows.len());
        let mut status = Vec::with_capacity(rows.len());
        let mut input = Vec::with_capacity(rows.len());
        let mut output = Vec::with_capacity(rows.len());
        let mut c5 = Vec::with_capacity(rows.len());
        let mut c1 = Vec::with_capacity(rows.len());
        let mut cr = Vec::with_capacity(rows.len());
        let mut cost = Vec::with_capacity(rows.len());
        for r in rows {
            ts.push(r.ts.as_str());
            ts_ms.push(r.ts_ms);
            tenant.push(r.tenant.as_str());
            box_id.push(r.box_id.as_str());
            session_id.push(r.session_id.as_str());
            model.push(r.model.as_str());
            status.push(r.status as i64);
            input.push(r.input_tokens as i64);
            output.push(r.output_tokens as i64);
            c5.push(r.cache_creation_5m_tokens as i64);
            c1.push(r.cache_creation_1h_tokens as i64);
            cr.push(r.cache_read_tokens as i64);
            cost.push(r.cost_usd);
        }
        sqlx::query(
            "INSERT INTO usage (ts, ts_ms, tenant, box_id, session_id, model, status, input_tokens,
             output_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens, cache_read_tokens, cost_usd)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
             $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[],
             $12::bigint[], $13::float8[])",
        )
        .bind(&ts)
        .bind(&ts_ms)
        .bind(&tenant)
        .bind(&box_id)
        .bind(&session_id)
        .bind(&model)
        .bind(&status)
        .bind(&input)
        .bind(&output)
        .bind(&c5)
        .bind(&c1)
        .bind(&cr)
        .bind(&cost)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn usage_sums(&self, key: UsageKey, f: &UsageFilter) -> Result<Vec<UsageSum>> {
        let _t = timer("usage_sums");
        let text = dollars(&sql::usage_sums(key));
        let rows = sql::bind_usage(sqlx::query(&text), f)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(sql::usage_sum).collect())
    }

    async fn open_box_span(&self, span: &BoxSpan) -> Result<()> {
        sqlx::query(pg!(sql::OPEN_SPAN))
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
            "UPDATE box_time SET end_ms = GREATEST(start_ms, $1), seen_ms = GREATEST(start_ms, $1)
             WHERE box_id = $2 AND end_ms IS NULL",
        )
        .bind(end_ms)
        .bind(box_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mark_box_spans_seen(&self, now_ms: i64) -> Result<()> {
        sqlx::query("UPDATE box_time SET seen_ms = GREATEST(seen_ms, $1) WHERE end_ms IS NULL")
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
        let rows = sqlx::query(pg!(sql::SPANS))
            .bind(tenant)
            .bind(box_id)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(sql::box_span).collect())
    }

    async fn join_node(&self, node: &NodeObject, lease_ms: i64) -> Result<i64> {
        let _t = timer("join_node");
        let doc = serde_json::to_string(node).map_err(corrupt)?;
        let row = sqlx::query(pg!(sql::JOIN_NODE))
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
        let r = sqlx::query(pg!(sql::RENEW_NODE))
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
        let rows = sqlx::query(pg!(sql::LIST_NODES))
            .fetch_all(&self.pool)
            .await?;
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
        let r = sqlx::query(pg!(sql::CLAIM_LOST_NODE))
            .bind(reason)
            .bind(name)
            .bind(incarnation)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_node_state(&self, name: &str, state: berth_api::NodeState) -> Result<bool> {
        let r = sqlx::query(pg!(sql::SET_NODE_STATE))
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
            "UPDATE boxes SET state = $1, doc = $2, node = $3
             WHERE id = $4 AND node IS NOT DISTINCT FROM $5",
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
        let r = sqlx::query(pg!(sql::CLAIM_CRON_FIRE))
            .bind(due_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }
}

/// Create database `name` on the server `admin_url` points at unless it exists, and return
/// the URL of the new database (tests give each server a database of its own this way).
pub async fn ensure_database(admin_url: &str, name: &str) -> Result<String> {
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(StoreError::Conflict(format!(
            "database name {name:?}: lowercase letters, digits and _ only"
        )));
    }
    let opts = PgConnectOptions::from_str(admin_url)?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await?;
    let exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&pool)
        .await?
        .is_some();
    if !exists {
        // The name was checked above (identifiers cannot be bound); a concurrent creator wins.
        if let Err(e) = sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
        {
            let raced = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42P04") || d.is_unique_violation());
            if !raced {
                return Err(e.into());
            }
        }
    }
    pool.close().await;
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    // Replace the path (the database) of the URL, keeping user, host and options.
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(base.len());
    let mut url = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    Ok(url)
}
