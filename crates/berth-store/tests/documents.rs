//! The versioned-document table (`Store::put_document`), which the Managed Agents API's agents,
//! environments and sessions live in: versions are unique (the optimistic-concurrency check),
//! replace rewrites one version, tenants are apart, order is first-write order.

use berth_store::{Document, SqliteStore, Store, StoreError};
use serde_json::json;

fn doc(tenant: &str, id: &str, version: i64, v: serde_json::Value) -> Document {
    Document {
        kind: "agent".into(),
        tenant: tenant.into(),
        id: id.into(),
        version,
        body: v,
    }
}

#[tokio::test]
async fn versions_conflict_replace_rewrites_and_tenants_stay_apart() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = SqliteStore::open(&dir.path().join("s.db"))
        .await
        .expect("open");
    s.put_document(&doc("a", "x", 1, json!({"n": 1})), false)
        .await
        .expect("v1");
    s.put_document(&doc("a", "y", 1, json!({"n": 9})), false)
        .await
        .expect("y");
    s.put_document(&doc("a", "x", 2, json!({"n": 2})), false)
        .await
        .expect("v2");
    // A second writer of version 2 loses.
    let again = s
        .put_document(&doc("a", "x", 2, json!({"n": 3})), false)
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    // Replace rewrites a version in place, keeping its position.
    s.put_document(&doc("a", "x", 1, json!({"n": 1, "archived": true})), true)
        .await
        .expect("replace");
    let all = s.documents("agent", "a", None).await.expect("list");
    let seen: Vec<(&str, i64)> = all.iter().map(|d| (d.id.as_str(), d.version)).collect();
    assert_eq!(seen, vec![("x", 1), ("y", 1), ("x", 2)]);
    assert_eq!(all[0].body, json!({"n": 1, "archived": true}));
    assert_eq!(all[2].body, json!({"n": 2}));
    let x = s.documents("agent", "a", Some("x")).await.expect("x");
    assert_eq!(x.len(), 2);
    // Another tenant or kind sees nothing, and cannot delete.
    assert!(s.documents("agent", "b", None).await.expect("b").is_empty());
    assert!(s
        .documents("environment", "a", None)
        .await
        .expect("env")
        .is_empty());
    assert!(!s.delete_document("agent", "b", "x").await.expect("del b"));
    assert!(s.delete_document("agent", "a", "x").await.expect("del a"));
    let left = s.documents("agent", "a", None).await.expect("left");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, "y");
}
