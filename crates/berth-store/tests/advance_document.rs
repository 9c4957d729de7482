//! `Store::advance_document`, the compare-and-swap behind lost-update-free writes of
//! single-version documents, asserted the same way on SQLite and on PostgreSQL.

use berth_store::testing::PgCluster;
use berth_store::*;
use serde_json::{json, Value};
use std::sync::Arc;

fn doc(tenant: &str, version: i64, body: Value) -> Document {
    Document {
        kind: "environment".into(),
        tenant: tenant.into(),
        id: "e".into(),
        version,
        body,
    }
}

/// Moves only from the version it names, keeps one row, stays inside its tenant; of many
/// concurrent writers from one version exactly one wins.
async fn contract(s: Arc<dyn Store>) {
    s.put_document(&doc("a", 1, json!({"n": 1})), false)
        .await
        .expect("v1");
    assert!(s
        .advance_document(&doc("a", 2, json!({"n": 2})), 1)
        .await
        .expect("1→2"));
    // A writer that read version 1 is too late.
    assert!(!s
        .advance_document(&doc("a", 2, json!({"n": 3})), 1)
        .await
        .expect("stale"));
    // Another tenant's same id is not touched.
    assert!(!s
        .advance_document(&doc("b", 3, json!({"n": 4})), 2)
        .await
        .expect("other tenant"));
    let all = s.documents("environment", "a", None).await.expect("list");
    assert_eq!(all.len(), 1, "one row");
    assert_eq!((all[0].version, &all[0].body), (2, &json!({"n": 2})));
    let tries = (0..8).map(|i| {
        let s = s.clone();
        async move {
            s.advance_document(&doc("a", 3, json!({"n": 10 + i})), 2)
                .await
                .expect("race")
        }
    });
    let won = futures::future::join_all(tries)
        .await
        .into_iter()
        .filter(|w| *w)
        .count();
    assert_eq!(won, 1);
    let all = s.documents("environment", "a", None).await.expect("list");
    assert_eq!((all.len(), all[0].version), (1, 3));
}

#[tokio::test]
async fn on_sqlite() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = SqliteStore::open(&dir.path().join("berth.db"))
        .await
        .expect("open");
    contract(Arc::new(s)).await;
}

#[tokio::test]
async fn on_postgres() {
    let (admin, _cluster) = match std::env::var("BERTH_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => (u, None),
        _ => {
            let c = PgCluster::start().expect("test PostgreSQL");
            (c.url(), Some(c))
        }
    };
    let name = format!("advance_document_{}", std::process::id());
    let url = berth_store::postgres::ensure_database(&admin, &name)
        .await
        .expect("database");
    let s = PostgresStore::open(&url).await.expect("open");
    contract(Arc::new(s)).await;
}
