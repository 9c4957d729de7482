//! The `Store` contract, asserted the same way on SQLite and on PostgreSQL (the server named by
//! `BERTH_TEST_DATABASE_URL`, else a throw-away cluster this test starts), and what only a
//! shared store does: wake-ups across processes, concurrent writers, a PostgreSQL restart.

use berth_api::*;
use berth_store::testing::PgCluster;
use berth_store::*;
use serde_json::json;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A PostgreSQL server: the shared one (`BERTH_TEST_DATABASE_URL`), or a cluster of the
/// caller's own, stopped when the caller drops it (a static would never be dropped, leaving
/// the server running after the tests).
fn server() -> (String, Option<PgCluster>) {
    match std::env::var("BERTH_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => (u, None),
        _ => {
            let c = PgCluster::start().expect("test PostgreSQL");
            (c.url(), Some(c))
        }
    }
}

/// A fresh database (per test and process) on the test server.
async fn fresh_db(admin: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "conf_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    berth_store::postgres::ensure_database(admin, &name)
        .await
        .expect("create database")
}

fn event(s: &str, seq: i64) -> Event {
    Event {
        seq,
        session_id: s.into(),
        ts: "2026-01-01T00:00:00Z".into(),
        kind: EventKind::Stdout,
        data: serde_json::json!({"text": format!("line {seq}"), "n": seq}),
    }
}

fn a_box(id: &str, tenant: &str, created_at: &str) -> BoxObject {
    BoxObject {
        id: id.into(),
        tenant: tenant.into(),
        state: BoxState::Running,
        state_reason: None,
        backend: "native".into(),
        lifecycle: Lifecycle::Persistent,
        image: "host".into(),
        resources: Resources::default(),
        network: NetworkSpec::default(),
        env: Default::default(),
        idle_timeout_s: None,
        max_lifetime_s: None,
        labels: Default::default(),
        secrets: vec![],
        shared: false,
        keep_workspace: false,
        artifact: None,
        snapshot: None,
        node: None,
        placement: None,
        created_at: created_at.into(),
        updated_at: created_at.into(),
    }
}

fn a_session(id: &str, tenant: &str, box_id: &str, created_at: &str) -> SessionObject {
    SessionObject {
        id: id.into(),
        tenant: tenant.into(),
        box_id: box_id.into(),
        state: SessionState::Running,
        state_reason: None,
        agent: AgentSpec::Claude(ClaudeAgent::default()),
        workdir: "/workspace".into(),
        agent_session_id: None,
        cli_version: None,
        agent_cost_usd: Some(0.25),
        last_seq: 0,
        uid: None,
        node: None,
        created_at: created_at.into(),
        updated_at: created_at.into(),
    }
}

fn usage(tenant: &str, session: &str, model: &str, ts_ms: i64, tokens: u64) -> UsageRow {
    UsageRow {
        ts: "t".into(),
        ts_ms,
        tenant: tenant.into(),
        box_id: format!("box-{session}"),
        session_id: session.into(),
        model: model.into(),
        status: 200,
        input_tokens: tokens,
        output_tokens: 2 * tokens,
        cache_creation_5m_tokens: 1,
        cache_creation_1h_tokens: 2,
        cache_read_tokens: 3,
        cost_usd: tokens as f64 / 1000.0,
    }
}

/// Every method of the trait, with the same assertions whatever the store.
async fn conformance(st: &dyn Store) {
    st.ping().await.expect("ping");
    documents(st).await;
    latest_document_pages(st).await;

    // Event logs: append-only, gapless, per session.
    st.append_events(&[event("s1", 1), event("s1", 2), event("s2", 1)])
        .await
        .expect("append");
    for bad in [
        vec![event("s1", 2)],                 // reuses a seq
        vec![event("s1", 4)],                 // leaves a hole
        vec![event("s1", 3), event("s1", 5)], // a hole inside the batch
        vec![event("s3", 2)],                 // a new log must start at 1
        vec![event("s1", 3), event("s2", 1)], // one bad part refuses the whole batch
    ] {
        assert!(
            matches!(st.append_events(&bad).await, Err(StoreError::Conflict(_))),
            "{bad:?}"
        );
    }
    assert_eq!(st.last_seq("s1").await.expect("seq"), 2, "nothing partial");
    st.append_events(&(3..=300).map(|i| event("s1", i)).collect::<Vec<_>>())
        .await
        .expect("a big batch");
    let page = st.events_after("s1", 0, 100).await.expect("read");
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    assert_eq!(
        page[41].data,
        serde_json::json!({"text": "line 42", "n": 42})
    );
    assert_eq!(page[0].kind, EventKind::Stdout);
    assert_eq!(page[0].ts, "2026-01-01T00:00:00Z");
    assert_eq!(
        st.events_after("s1", 298, 100).await.expect("read").len(),
        2
    );
    assert_eq!(st.last_seq("s1").await.expect("seq"), 300);
    assert_eq!(st.last_seq("nope").await.expect("seq"), 0);
    assert!(st
        .events_after("nope", 0, 10)
        .await
        .expect("read")
        .is_empty());

    // Box event logs: the same rules, a separate log.
    st.append_box_events(&[event("b1", 1), event("b1", 2)])
        .await
        .expect("box events");
    assert!(matches!(
        st.append_box_events(&[event("b1", 4)]).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(st.last_box_seq("b1").await.expect("seq"), 2);
    assert_eq!(
        st.box_events_after("b1", 1, 10).await.expect("read")[0].seq,
        2
    );
    assert_eq!(st.last_seq("b1").await.expect("seq"), 0, "logs are apart");

    // Keys and tenants.
    assert_eq!(st.count_keys().await.expect("count"), 0);
    let key = |id: &str, tenant: &str, admin: bool, at: &str| KeyObject {
        id: id.into(),
        key: None,
        tenant: tenant.into(),
        admin,
        created_at: at.into(),
    };
    st.insert_key(&key("k1", "acme", true, "2026-01-01T00:00:01Z"), "h1")
        .await
        .expect("key");
    st.insert_key(&key("k2", "beta", false, "2026-01-01T00:00:02Z"), "h2")
        .await
        .expect("key");
    assert!(matches!(
        st.insert_key(&key("k3", "acme", false, "t"), "h1").await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        st.find_key("h1").await.expect("find"),
        Some(KeyRecord {
            id: "k1".into(),
            tenant: "acme".into(),
            admin: true
        })
    );
    assert!(st.find_key("h9").await.expect("find").is_none());
    let all = st.list_keys(None).await.expect("list");
    assert_eq!(
        all.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        ["k1", "k2"]
    );
    assert!(!all[1].admin);
    assert_eq!(st.list_keys(Some("beta")).await.expect("list").len(), 1);
    // One key by tenant and id: another tenant's id is none of this tenant's.
    let k1 = st.get_key("acme", "k1").await.expect("get").expect("k1");
    assert_eq!((k1.id.as_str(), k1.admin, k1.key), ("k1", true, None));
    assert_eq!(k1.created_at, "2026-01-01T00:00:01Z");
    assert!(st.get_key("beta", "k1").await.expect("get").is_none());
    assert!(st.get_key("acme", "k9").await.expect("get").is_none());
    assert!(st.delete_key("k2").await.expect("delete"));
    assert!(!st.delete_key("k2").await.expect("delete twice"));
    assert!(
        st.get_key("beta", "k2").await.expect("get").is_none(),
        "deleted"
    );
    assert_eq!(st.count_keys().await.expect("count"), 1);

    // Boxes and sessions: upserts, tenancy, order.
    st.put_box(&a_box("b2", "acme", "2026-01-01T00:00:02Z"))
        .await
        .expect("put");
    st.put_box(&a_box("b1", "acme", "2026-01-01T00:00:01Z"))
        .await
        .expect("put");
    st.put_box(&a_box("b3", "beta", "2026-01-01T00:00:03Z"))
        .await
        .expect("put");
    let mut parked = a_box("b1", "acme", "2026-01-01T00:00:01Z");
    parked.state = BoxState::Parked;
    st.put_box(&parked).await.expect("update");
    assert_eq!(
        st.get_box(Some("acme"), "b1")
            .await
            .expect("get")
            .map(|b| b.state),
        Some(BoxState::Parked)
    );
    assert!(st.get_box(Some("beta"), "b1").await.expect("get").is_none());
    assert!(st.get_box(None, "b1").await.expect("get").is_some());
    assert_eq!(
        st.list_boxes(Some("acme"))
            .await
            .expect("list")
            .iter()
            .map(|b| b.id.as_str())
            .collect::<Vec<_>>(),
        ["b1", "b2"]
    );
    assert_eq!(st.list_boxes(None).await.expect("list").len(), 3);
    let mut s = a_session("s1", "acme", "b1", "2026-01-01T00:00:01Z");
    st.put_session(&s).await.expect("put");
    st.put_session(&a_session("s2", "acme", "b2", "2026-01-01T00:00:02Z"))
        .await
        .expect("put");
    s.state = SessionState::Stopped;
    s.last_seq = 300;
    st.put_session(&s).await.expect("update");
    assert_eq!(
        st.get_session(Some("acme"), "s1").await.expect("get"),
        Some(s.clone())
    );
    assert!(st
        .get_session(Some("beta"), "s1")
        .await
        .expect("get")
        .is_none());
    assert_eq!(
        st.list_sessions(Some("acme"), Some("b2"))
            .await
            .expect("list")
            .len(),
        1
    );
    assert_eq!(st.list_sessions(None, None).await.expect("list").len(), 2);

    // A session's events and its record: one transaction.
    let mut c = a_session("s9", "acme", "b1", "2026-01-01T00:00:09Z");
    c.last_seq = 2;
    st.commit_session(&c, &[event("s9", 1), event("s9", 2)])
        .await
        .expect("commit");
    assert_eq!(
        st.get_session(None, "s9").await.expect("get"),
        Some(c.clone())
    );
    assert_eq!(st.last_seq("s9").await.expect("seq"), 2);
    // A refused batch (a hole) writes neither the events nor the record.
    let mut ahead = c.clone();
    ahead.last_seq = 4;
    ahead.state = SessionState::Stopped;
    assert!(matches!(
        st.commit_session(&ahead, &[event("s9", 4)]).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        st.get_session(None, "s9").await.expect("get"),
        Some(c.clone()),
        "the record as it was"
    );
    assert_eq!(st.last_seq("s9").await.expect("seq"), 2);
    // The record alone.
    c.state = SessionState::Idle;
    st.commit_session(&c, &[]).await.expect("record only");
    assert_eq!(
        st.get_session(Some("acme"), "s9")
            .await
            .expect("get")
            .map(|s| s.state),
        Some(SessionState::Idle)
    );
    assert_eq!(st.last_seq("s9").await.expect("seq"), 2);

    // Budgets.
    assert_eq!(st.tenant_budget("acme").await.expect("budget"), None);
    st.set_tenant_budget("acme", Some(12.5)).await.expect("set");
    st.set_tenant_budget("newco", Some(3.0)).await.expect("new");
    assert_eq!(st.tenant_budget("acme").await.expect("budget"), Some(12.5));
    st.set_tenant_budget("newco", None).await.expect("clear");
    assert_eq!(
        st.tenant_budgets().await.expect("budgets"),
        vec![("acme".to_string(), 12.5)]
    );

    // Triggers: the secret beside the document.
    let trig: TriggerObject = serde_json::from_value(serde_json::json!({
        "id": "t1", "tenant": "acme", "box": "b1",
        "agent": {"kind": "claude"}, "prompt": "hi", "schedule": null, "webhook_path": "/hooks/t1",
        "workdir": null, "fired": 0, "last_fired_at": null, "last_session_id": null,
        "last_error": null, "created_at": "2026-01-01T00:00:00Z"
    }))
    .expect("trigger json");
    st.put_trigger(&trig, "sekrit").await.expect("put");
    let mut fired = trig.clone();
    fired.fired = 3;
    st.update_trigger(&fired).await.expect("update");
    let (got, secret) = st
        .get_trigger(Some("acme"), "t1")
        .await
        .expect("get")
        .expect("there");
    assert_eq!((got.fired, secret.as_str()), (3, "sekrit"));
    assert!(st
        .get_trigger(Some("beta"), "t1")
        .await
        .expect("get")
        .is_none());
    assert_eq!(st.list_triggers(None).await.expect("list").len(), 1);
    assert!(!st.delete_trigger(Some("beta"), "t1").await.expect("delete"));
    assert!(st.delete_trigger(Some("acme"), "t1").await.expect("delete"));
    assert!(st.list_triggers(None).await.expect("list").is_empty());

    // Usage: group-committed rows, sums by key and model, filters.
    st.record_usage(&[
        usage("a", "s1", "m1", 1_000, 10),
        usage("a", "s1", "m2", 2_000, 20),
        usage("a", "s2", "m1", 3_000, 30),
    ])
    .await
    .expect("record");
    st.record_usage(
        &(0..100)
            .map(|i| usage("b", "s3", "m1", 4_000 + i, 1))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("record a batch");
    st.record_usage(&[]).await.expect("nothing");
    let by_model = st
        .usage_sums(UsageKey::Model, &UsageFilter::default())
        .await
        .expect("sums");
    assert_eq!(by_model.len(), 2);
    assert_eq!(
        by_model[0],
        UsageSum {
            key: "m1".into(),
            model: "m1".into(),
            requests: 102,
            input_tokens: 140,
            output_tokens: 280,
            cache_creation_5m_tokens: 102,
            cache_creation_1h_tokens: 204,
            cache_read_tokens: 306,
            cost_usd: by_model[0].cost_usd,
        }
    );
    assert!((by_model[0].cost_usd - 0.14).abs() < 1e-9);
    let f = UsageFilter {
        tenant: Some("a".into()),
        from_ms: Some(2_000),
        to_ms: Some(3_000),
        ..Default::default()
    };
    let s = st.usage_sums(UsageKey::Session, &f).await.expect("sums");
    assert_eq!(
        s.iter()
            .map(|x| (x.key.as_str(), x.model.as_str(), x.input_tokens))
            .collect::<Vec<_>>(),
        [("s1", "m2", 20)]
    );
    let f = UsageFilter {
        session_id: Some("s3".into()),
        ..Default::default()
    };
    let b = st.usage_sums(UsageKey::Box, &f).await.expect("sums");
    assert_eq!((b[0].key.as_str(), b[0].requests), ("box-s3", 100));
    let t = st
        .usage_sums(UsageKey::Tenant, &UsageFilter::default())
        .await
        .expect("sums");
    assert_eq!(
        t.iter().map(|x| x.key.as_str()).collect::<Vec<_>>(),
        ["a", "a", "b"]
    );

    usage_over_hours(st).await;

    // Container time spans.
    let span = |id: &str, start_ms: i64| BoxSpan {
        box_id: id.into(),
        tenant: "a".into(),
        start_ms,
        end_ms: None,
        cpus: 1.5,
        memory_mib: 1024,
    };
    st.open_box_span(&span("b1", 1_000)).await.expect("open");
    st.open_box_span(&span("b2", 2_000)).await.expect("open");
    st.close_box_span("b1", 500)
        .await
        .expect("close before start");
    st.close_box_span("b1", 9_000).await.expect("close twice");
    st.mark_box_spans_seen(7_000).await.expect("seen");
    st.mark_box_spans_seen(6_000)
        .await
        .expect("seen goes forward only");
    let spans = st.box_spans(None, None, None, None).await.expect("spans");
    assert_eq!(spans[0].end_ms, Some(1_000), "clamped to its start");
    assert_eq!(spans[1].end_ms, None);
    assert_eq!((spans[1].cpus, spans[1].memory_mib), (1.5, 1024));
    assert_eq!(
        st.box_spans(None, None, Some(1_000), None)
            .await
            .expect("spans")
            .len(),
        1
    );
    assert_eq!(
        st.box_spans(None, None, None, Some(2_000))
            .await
            .expect("spans")
            .len(),
        1
    );
    assert_eq!(st.close_abandoned_box_spans().await.expect("abandoned"), 1);
    let spans = st
        .box_spans(Some("a"), Some("b2"), None, None)
        .await
        .expect("spans");
    assert_eq!(spans[0].end_ms, Some(7_000));
    assert!(st
        .box_spans(Some("zzz"), None, None, None)
        .await
        .expect("spans")
        .is_empty());
}

fn a_node(name: &str) -> NodeObject {
    NodeObject {
        name: name.into(),
        advertise_url: format!("http://{name}:7700"),
        state: NodeState::Active,
        incarnation: 0,
        lease_expires_at: String::new(),
        backends: vec!["native".into()],
        capacity: NodeCapacity {
            cpus: 2.0,
            memory_mib: 4096,
            disk_mib: 10_000,
            boxes: 100,
        },
        load: NodeCapacity::default(),
        state_reason: None,
        labels: Default::default(),
        joined_at: "2026-01-01T00:00:00Z".into(),
    }
}

/// Nodes: joins bump the incarnation; a lease renews only for the holder of the newest
/// incarnation; a lapsed lease is claimed lost by exactly one caller; a box's record is
/// written only by its holder and moves between holders by compare-and-set; a cron instant
/// is claimed once.
async fn nodes(st: &dyn Store) {
    let n1 = a_node("n1");
    assert_eq!(st.join_node(&n1, 5_000).await.expect("join"), 1);
    assert_eq!(st.join_node(&a_node("n2"), 5_000).await.expect("join"), 1);
    assert!(st.renew_node(&n1, 1, 6_000).await.expect("renew"));
    // A rejoin supersedes the old incarnation: its renewals fail.
    assert_eq!(st.join_node(&n1, 6_000).await.expect("rejoin"), 2);
    assert!(!st.renew_node(&n1, 1, 7_000).await.expect("stale renew"));
    assert!(st.renew_node(&n1, 2, 7_000).await.expect("renew"));
    let rows = st.list_nodes().await.expect("list");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].node.name, "n1");
    assert_eq!(rows[0].node.incarnation, 2);
    assert_eq!(rows[0].lease_ms, 7_000);
    // Not lapsed yet: no claim; the wrong incarnation: no claim.
    assert!(!st
        .claim_lost_node("n1", 2, 7_000, "x")
        .await
        .expect("early"));
    assert!(!st.claim_lost_node("n1", 1, 9_000, "x").await.expect("old"));
    // Lapsed: one claimer wins.
    assert!(st
        .claim_lost_node("n1", 2, 9_000, "lease lapsed")
        .await
        .expect("claim"));
    assert!(!st
        .claim_lost_node("n1", 2, 9_000, "again")
        .await
        .expect("twice"));
    assert!(!st.renew_node(&n1, 2, 10_000).await.expect("lost renew"));
    assert!(!st
        .set_node_state("n1", NodeState::Draining)
        .await
        .expect("lost"));
    let rows = st.list_nodes().await.expect("list");
    assert_eq!(rows[0].node.state, NodeState::Lost);
    assert_eq!(rows[0].node.state_reason.as_deref(), Some("lease lapsed"));
    // A draining node stays draining when it rejoins; a lost one comes back active.
    assert!(st
        .set_node_state("n2", NodeState::Draining)
        .await
        .expect("drain"));
    assert_eq!(st.join_node(&a_node("n2"), 9_000).await.expect("rejoin"), 2);
    assert_eq!(st.join_node(&n1, 9_000).await.expect("rejoin"), 3);
    let rows = st.list_nodes().await.expect("list");
    assert_eq!(rows[0].node.state, NodeState::Active);
    assert_eq!(rows[1].node.state, NodeState::Draining);

    // Boxes: only the holder writes; a claim moves the holder once.
    let mut b = a_box("nb1", "acme", "2026-01-01T00:00:01Z");
    b.node = Some("n1".into());
    st.put_box(&b).await.expect("put");
    let mut other = b.clone();
    other.node = Some("n2".into());
    other.state = BoxState::Stopped;
    let r = st.put_box(&other).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    let mut released = b.clone();
    released.node = None;
    released.state = BoxState::Parked;
    assert!(st.claim_box(&released, Some("n1")).await.expect("release"));
    // The old holder's late write is refused.
    assert!(matches!(st.put_box(&b).await, Err(StoreError::Conflict(_))));
    assert!(st.claim_box(&other, None).await.expect("claim"));
    let mut third = b.clone();
    third.node = Some("n3".into());
    assert!(!st.claim_box(&third, None).await.expect("second claim"));
    let got = st.get_box(None, "nb1").await.expect("get").expect("box");
    assert_eq!(got.node.as_deref(), Some("n2"));
    assert_eq!(got.state, BoxState::Stopped);

    // Cron: each instant once, never an earlier one after a later.
    let trig: TriggerObject = serde_json::from_value(serde_json::json!({
        "id": "cron1", "tenant": "acme", "box": "b1",
        "agent": {"kind": "claude"}, "prompt": "hi", "schedule": "* * * * *", "webhook_path": null,
        "workdir": null, "fired": 0, "last_fired_at": null, "last_session_id": null,
        "last_error": null, "created_at": "2026-01-01T00:00:00Z"
    }))
    .expect("trigger json");
    st.put_trigger(&trig, "s").await.expect("put");
    assert!(st.claim_cron_fire("cron1", 60_000).await.expect("claim"));
    assert!(!st.claim_cron_fire("cron1", 60_000).await.expect("twice"));
    assert!(!st.claim_cron_fire("cron1", 0).await.expect("earlier"));
    assert!(st.claim_cron_fire("cron1", 120_000).await.expect("next"));
    assert!(!st.claim_cron_fire("nope", 1).await.expect("none"));
}

/// Sessions are fenced like boxes: an existing session is written by the node its row names
/// or by its box's holder now; a node that lost the box (a cut-off node that came back)
/// writes nothing, not even with its events.
async fn sessions_fenced(st: &dyn Store) {
    let held = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Conflict(_)));
    let mut b = a_box("fb1", "acme", "2026-01-01T00:00:01Z");
    b.node = Some("n1".into());
    st.put_box(&b).await.expect("box");
    let mut s = a_session("fs1", "acme", "fb1", "2026-01-01T00:00:02Z");
    s.node = Some("n1".into());
    st.put_session(&s).await.expect("insert");
    s.last_seq = 0;
    st.put_session(&s).await.expect("its node writes");
    // Another node, holding neither the session nor its box: refused, nothing changed.
    let mut stray = s.clone();
    stray.node = Some("n2".into());
    stray.state = SessionState::Failed;
    assert!(held(st.put_session(&stray).await), "a stranger's write");
    let got = st.get_session(None, "fs1").await.expect("get").expect("s");
    assert_eq!(
        (got.state, got.node.as_deref()),
        (SessionState::Running, Some("n1"))
    );
    // n1 is lost: the settling node clears the box's holder, then the session's.
    let mut released = b.clone();
    released.node = None;
    released.state = BoxState::Lost;
    assert!(st.claim_box(&released, Some("n1")).await.expect("release"));
    let mut settled = s.clone();
    settled.node = None;
    settled.state = SessionState::Interrupted;
    st.put_session(&settled).await.expect("settled");
    // n1 comes back: its writes, and its events with them, are refused.
    let mut late = s.clone();
    late.state = SessionState::Idle;
    late.last_seq = 1;
    assert!(held(st.put_session(&late).await), "the old node's write");
    assert!(
        held(st.commit_session(&late, &[event("fs1", 1)]).await),
        "with events"
    );
    assert!(st
        .events_after("fs1", 0, 10)
        .await
        .expect("read")
        .is_empty());
    let got = st.get_session(None, "fs1").await.expect("get").expect("s");
    assert_eq!((got.state, got.node), (SessionState::Interrupted, None));
    // A node that takes the box over (a restore) takes its sessions with it.
    let mut taken = released.clone();
    taken.node = Some("n2".into());
    taken.state = BoxState::Running;
    assert!(st.claim_box(&taken, None).await.expect("take"));
    let mut resumed = settled.clone();
    resumed.node = Some("n2".into());
    resumed.state = SessionState::Running;
    st.put_session(&resumed)
        .await
        .expect("the new holder writes");
    assert!(held(st.put_session(&late).await), "still not the old node");
    let got = st.get_session(None, "fs1").await.expect("get").expect("s");
    assert_eq!(got.node.as_deref(), Some("n2"));
}

#[tokio::test]
async fn sqlite_conforms() {
    let dir = tempfile::tempdir().expect("tmp");
    let st = SqliteStore::open(&dir.path().join("berth.db"))
        .await
        .expect("open");
    conformance(&st).await;
    nodes(&st).await;
    sessions_fenced(&st).await;
    assert!(st.watch_session("s1").is_none(), "no other writer");
}

#[tokio::test]
async fn postgres_conforms() {
    let (admin, _cluster) = server();
    let st = PostgresStore::open(&fresh_db(&admin).await)
        .await
        .expect("open postgres");
    conformance(&st).await;
    nodes(&st).await;
    sessions_fenced(&st).await;
}

/// A reader that sees a session's event sees the record as of that event or later: one
/// writer commits 300 batches (`commit_session`) while a reader on other connections (another
/// process's store, for PostgreSQL) reads where the log ends, then the record.
async fn readers_see_the_record_with_its_events(w: Arc<dyn Store>, r: Arc<dyn Store>) {
    let mut s = a_session("atomic", "acme", "b1", "2026-01-01T00:00:00Z");
    w.commit_session(&s, &[]).await.expect("record");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = tokio::spawn({
        let done = done.clone();
        async move {
            let mut checks = 0u32;
            while !done.load(Ordering::Relaxed) {
                let seen = r.last_seq("atomic").await.expect("seq");
                let record = r
                    .get_session(None, "atomic")
                    .await
                    .expect("get")
                    .expect("there")
                    .last_seq;
                assert!(
                    record >= seen,
                    "event {seen} visible before the record reflects it ({record})"
                );
                checks += 1;
            }
            checks
        }
    });
    for seq in 1..=300 {
        s.last_seq = seq;
        w.commit_session(&s, &[event("atomic", seq)])
            .await
            .expect("commit");
    }
    done.store(true, Ordering::Relaxed);
    let checks = reader.await.expect("reader");
    assert!(checks > 10, "the reader ran alongside ({checks} reads)");
}

#[tokio::test]
async fn sqlite_readers_see_the_record_with_its_events() {
    let dir = tempfile::tempdir().expect("tmp");
    let st: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("berth.db"))
            .await
            .expect("open"),
    );
    readers_see_the_record_with_its_events(st.clone(), st).await;
}

#[tokio::test]
async fn postgres_readers_see_the_record_with_its_events() {
    let (admin, _cluster) = server();
    let url = fresh_db(&admin).await;
    let w: Arc<dyn Store> = Arc::new(PostgresStore::open(&url).await.expect("writer"));
    let r: Arc<dyn Store> = Arc::new(PostgresStore::open(&url).await.expect("reader"));
    readers_see_the_record_with_its_events(w, r).await;
}

/// Usage rows deleted behind the server's back (an operator's DELETE: no server deletes usage)
/// leave the hourly rollup too: the sums still equal the rows that are left.
async fn deleted_usage_rows_leave_the_sums(st: &dyn Store, delete: impl AsyncFnOnce(&str)) {
    let rows = hour_rows();
    st.record_usage(&rows).await.expect("record");
    // A whole session, and every other row of one tenant (whole and partial hours both).
    delete("DELETE FROM usage WHERE session_id = 'hs4' OR (tenant = 'h1' AND ts_ms % 2 = 0)").await;
    let left: Vec<UsageRow> = rows
        .into_iter()
        .filter(|r| !(r.session_id == "hs4" || (r.tenant == "h1" && r.ts_ms % 2 == 0)))
        .collect();
    assert!(left.len() > 200 && left.len() < 500, "{}", left.len());
    assert_sums_match_rows(st, &left).await;
}

#[tokio::test]
async fn sqlite_deleted_usage_rows_leave_the_sums() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("berth.db");
    let st = SqliteStore::open(&path).await.expect("open");
    deleted_usage_rows_leave_the_sums(&st, async |sql| {
        let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("connect");
        sqlx::query(sql).execute(&db).await.expect("delete");
        db.close().await;
    })
    .await;
}

#[tokio::test]
async fn postgres_deleted_usage_rows_leave_the_sums() {
    let (admin, _cluster) = server();
    let url = fresh_db(&admin).await;
    let st = PostgresStore::open(&url).await.expect("open postgres");
    deleted_usage_rows_leave_the_sums(&st, async |sql| {
        let db = sqlx::PgPool::connect(&url).await.expect("connect");
        sqlx::query(sql).execute(&db).await.expect("delete");
        db.close().await;
    })
    .await;
}

#[tokio::test]
async fn open_picks_the_store_by_url() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("x.db");
    let st = berth_store::open(
        Some(&format!("sqlite://{}", path.display())),
        &dir.path().join("default.db"),
        Durability::Crash,
    )
    .await
    .expect("sqlite url");
    st.ping().await.expect("ping");
    assert!(path.exists() && !dir.path().join("default.db").exists());
    let (admin, _cluster) = server();
    let url = fresh_db(&admin).await;
    let pg = berth_store::open(Some(&url), &path, Durability::Crash)
        .await
        .expect("postgres url");
    assert!(pg.watch_session("s").is_some(), "a shared store");
    assert!(matches!(
        berth_store::open(Some("mysql://x"), &path, Durability::Crash).await,
        Err(StoreError::Url(_))
    ));
}

/// Two stores on one database stand for two server processes: a commit through one wakes a
/// watcher of the other, and concurrent writers of one log cannot both win a seq.
#[tokio::test]
async fn postgres_shares_commits_between_processes() {
    let (admin, _cluster) = server();
    let url = fresh_db(&admin).await;
    let a = Arc::new(PostgresStore::open(&url).await.expect("a"));
    let b = Arc::new(PostgresStore::open(&url).await.expect("b"));
    let mut wake = b.watch_session("s1").expect("watch");
    let mut other = b.watch_session("s2").expect("watch");
    // The listener may still be connecting; a commit before it listens is not announced, so
    // commit until the first wake-up arrives (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seq = 0;
    loop {
        seq += 1;
        a.append_events(&[event("s1", seq)]).await.expect("append");
        match tokio::time::timeout(Duration::from_millis(200), wake.changed()).await {
            Ok(r) => {
                r.expect("changed");
                break;
            }
            Err(_) => assert!(tokio::time::Instant::now() < deadline, "no wake-up"),
        }
    }
    // The listener's (re)connection wakes every watcher once; past that, only commits do.
    other.borrow_and_update();
    // Now every commit wakes it, promptly.
    for _ in 0..20 {
        seq += 1;
        let t = std::time::Instant::now();
        a.append_events(&[event("s1", seq)]).await.expect("append");
        tokio::time::timeout(Duration::from_secs(5), wake.changed())
            .await
            .expect("woken in time")
            .expect("changed");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(
            b.last_seq("s1").await.expect("seq"),
            seq,
            "visible when woken"
        );
    }
    assert!(
        !other.has_changed().expect("open"),
        "only the session's watchers"
    );
    a.append_events(&[event("s2", 1)]).await.expect("append");
    tokio::time::timeout(Duration::from_secs(5), other.changed())
        .await
        .expect("woken")
        .expect("changed");

    // Racing writers: 8 tasks on two "processes" each try to append the next seq, 50 rounds;
    // every round exactly one wins and the log stays gapless.
    let base = b.last_seq("s1").await.expect("seq");
    for round in 1..=50 {
        let next = base + round;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let st = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                st.append_events(&[event("s1", next)]).await
            }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(()) => won += 1,
                Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
    let all = a.events_after("s1", 0, 10_000).await.expect("read");
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=base + 50).collect::<Vec<_>>()
    );
}

/// PostgreSQL crashes and comes back: committed events are all there, the pool reconnects,
/// and the listener re-listens and wakes its watchers (commits in the gap went unannounced).
#[tokio::test]
async fn postgres_restart_is_survived() {
    let mut pg = PgCluster::start().expect("cluster");
    let url = berth_store::postgres::ensure_database(&pg.url(), "berth")
        .await
        .expect("db");
    let st = PostgresStore::open(&url).await.expect("open");
    let mut wake = st.watch_session("s1").expect("watch");
    st.append_events(&(1..=100).map(|i| event("s1", i)).collect::<Vec<_>>())
        .await
        .expect("append");
    pg.crash().expect("crash");
    assert!(st.ping().await.is_err(), "down");
    pg.restart().expect("restart");
    // The pool replaces its dead connections; a bounded wait for the first success.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while st.ping().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let evs = st.events_after("s1", 0, 1000).await.expect("read");
    assert_eq!(
        evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    st.append_events(&[event("s1", 101)]).await.expect("append");
    // Woken by the listener's reconnection and/or the new commit; then every further commit
    // wakes it again.
    tokio::time::timeout(Duration::from_secs(20), wake.changed())
        .await
        .expect("woken after the restart")
        .expect("changed");
    let mut seq = 101;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        seq += 1;
        st.append_events(&[event("s1", seq)]).await.expect("append");
        if tokio::time::timeout(Duration::from_millis(300), wake.changed())
            .await
            .is_ok()
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "listener not back");
    }
}

fn doc_v(tenant: &str, id: &str, version: i64, v: serde_json::Value) -> Document {
    Document {
        kind: "agent".into(),
        tenant: tenant.into(),
        id: id.into(),
        version,
        body: v,
    }
}

/// The versioned-document table (`Store::put_document`), which the Managed Agents API's agents,
/// environments and sessions live in: versions are unique (the optimistic-concurrency check),
/// replace rewrites one version, tenants are apart, order is first-write order.
async fn documents(s: &dyn Store) {
    s.put_document(&doc_v("a", "x", 1, json!({"n": 1})), false)
        .await
        .expect("v1");
    s.put_document(&doc_v("a", "y", 1, json!({"n": 9})), false)
        .await
        .expect("y");
    s.put_document(&doc_v("a", "x", 2, json!({"n": 2})), false)
        .await
        .expect("v2");
    // A second writer of version 2 loses.
    let again = s
        .put_document(&doc_v("a", "x", 2, json!({"n": 3})), false)
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    // Replace rewrites a version in place, keeping its position.
    s.put_document(&doc_v("a", "x", 1, json!({"n": 1, "archived": true})), true)
        .await
        .expect("replace");
    let all = s.documents("agent", "a", None).await.expect("list");
    let seen: Vec<(&str, i64)> = all.iter().map(|d| (d.id.as_str(), d.version)).collect();
    assert_eq!(seen, vec![("x", 1), ("y", 1), ("x", 2)]);
    assert_eq!(all[0].body, json!({"n": 1, "archived": true}));
    assert_eq!(all[2].body, json!({"n": 2}));
    let x = s.documents("agent", "a", Some("x")).await.expect("x");
    assert_eq!(x.len(), 2);
    // The count is of every version, per tenant and kind, as `documents` lists them.
    assert_eq!(s.count_documents("agent", "a").await.expect("count"), 3);
    assert_eq!(s.count_documents("agent", "b").await.expect("count b"), 0);
    assert_eq!(s.count_documents("environment", "a").await.expect("env"), 0);
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
    assert_eq!(s.count_documents("agent", "a").await.expect("count"), 1);
}

/// Keyset pages of the latest version of each document (`Store::latest_documents`): each id
/// once at its highest version, in id order either way, from after a cursor, other tenants'
/// and kinds' documents apart; walking the pages visits every document exactly once.
async fn latest_document_pages(s: &dyn Store) {
    for (id, versions) in [("p1", 1), ("p3", 3), ("p2", 2), ("p5", 1), ("p4", 2)] {
        for v in 1..=versions {
            s.put_document(&doc_v("pages", id, v, json!({"id": id, "v": v})), false)
                .await
                .expect("put");
        }
    }
    s.put_document(&doc_v("other", "p9", 1, json!({})), false)
        .await
        .expect("other tenant");
    let page = |after: Option<&'static str>, desc: bool, limit: i64| async move {
        s.latest_documents("agent", "pages", after, desc, limit)
            .await
            .expect("page")
            .into_iter()
            .map(|d| (d.id, d.version))
            .collect::<Vec<_>>()
    };
    let ids = |v: &[(&str, i64)]| {
        v.iter()
            .map(|(i, n)| (i.to_string(), *n))
            .collect::<Vec<_>>()
    };
    assert_eq!(page(None, true, 2).await, ids(&[("p5", 1), ("p4", 2)]));
    assert_eq!(
        page(Some("p4"), true, 2).await,
        ids(&[("p3", 3), ("p2", 2)])
    );
    assert_eq!(page(Some("p2"), true, 5).await, ids(&[("p1", 1)]));
    assert_eq!(page(Some("p1"), true, 5).await, ids(&[]));
    assert_eq!(
        page(None, false, 3).await,
        ids(&[("p1", 1), ("p2", 2), ("p3", 3)])
    );
    assert_eq!(
        page(Some("p3"), false, 3).await,
        ids(&[("p4", 2), ("p5", 1)])
    );
    // A cursor need not name a document that is still there.
    assert_eq!(page(Some("p35"), false, 1).await, ids(&[("p4", 2)]));
    assert!(s
        .latest_documents("environment", "pages", None, true, 10)
        .await
        .expect("kind")
        .is_empty());
    // Walking every page in steps of one sees each document once.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let got = s
            .latest_documents("agent", "pages", after.as_deref(), true, 1)
            .await
            .expect("walk");
        let Some(d) = got.into_iter().next() else {
            break;
        };
        after = Some(d.id.clone());
        seen.push(d.id);
    }
    assert_eq!(seen, vec!["p5", "p4", "p3", "p2", "p1"]);
}

/// Sums over windows that cut hours anywhere (whole hours come from the hourly rollup, the
/// edges from the rows) equal sums of the rows themselves, for every key and filter.
async fn usage_over_hours(st: &dyn Store) {
    let rows = hour_rows();
    let mut at = 0;
    for n in [1, 7, 64, 128, 400] {
        st.record_usage(&rows[at..at + n]).await.expect("record");
        at += n;
    }
    assert_eq!(at, rows.len());
    assert_sums_match_rows(st, &rows).await;
}

/// The start of the first of the ten hours `hour_rows` spreads over: far from the other usage
/// rows of the suite (they are in the first hour of 1970).
const HOURS_BASE: i64 = 1_800_000_000_000; // a whole hour: 500,000 × 3,600,000

/// A deterministic spread of 600 rows: 3 tenants (`h0`..`h2`), 6 sessions (`hs0`..`hs5`), 2
/// models over 10 hours from `HOURS_BASE`, some rows on the hour exactly.
fn hour_rows() -> Vec<UsageRow> {
    const H: i64 = 3_600_000;
    let base = HOURS_BASE;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut rows = Vec::new();
    for i in 0..600 {
        let s = rnd(6);
        let ts_ms = if i % 50 == 0 {
            base + rnd(10) as i64 * H
        } else {
            base + rnd(10 * H as u64) as i64
        };
        let mut r = usage(
            &format!("h{}", s % 3),
            &format!("hs{s}"),
            ["hm1", "hm2"][rnd(2) as usize],
            ts_ms,
            1 + rnd(100),
        );
        r.cache_read_tokens = rnd(7);
        rows.push(r);
    }
    rows
}

/// `usage_sums` over windows cutting hours anywhere, every key, with and without tenant and
/// session filters, equals the sums computed here from `rows` (the store's `h*` usage).
async fn assert_sums_match_rows(st: &dyn Store, rows: &[UsageRow]) {
    const H: i64 = 3_600_000;
    let base = HOURS_BASE;
    let windows = [
        (None, None),
        (Some(base), None),
        (Some(base + 1), Some(base + 10 * H)),
        (Some(base + 90 * 60_000), Some(base + 7 * H + 1)),
        (Some(base + 2 * H), Some(base + 5 * H)),
        (Some(base + 3 * H + 10), Some(base + 3 * H + 20 * 60_000)),
        (Some(base + 3 * H + 10), Some(base + 4 * H + 10)),
        (None, Some(base + 4 * H + 5)),
    ];
    for (from_ms, to_ms) in windows {
        for tenant in [None, Some("h1")] {
            // All tenants: only from `base` on (the rows recorded before are in 1970).
            let from_ms = match tenant {
                None => Some(from_ms.unwrap_or(base).max(base)),
                Some(_) => from_ms,
            };
            for session in [None, Some("hs4")] {
                let f = UsageFilter {
                    tenant: tenant.map(str::to_string),
                    session_id: session.map(str::to_string),
                    from_ms,
                    to_ms,
                };
                for key in [
                    UsageKey::Session,
                    UsageKey::Box,
                    UsageKey::Tenant,
                    UsageKey::Model,
                ] {
                    let got = st.usage_sums(key, &f).await.expect("sums");
                    let want = reference_sums(rows, key, &f);
                    // Costs are float sums in another order: compared apart, within 1e-9.
                    let costless = |v: &[UsageSum]| {
                        v.iter()
                            .map(|s| UsageSum {
                                cost_usd: 0.0,
                                ..s.clone()
                            })
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(costless(&got), costless(&want), "{key:?} {f:?}");
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g.cost_usd - w.cost_usd).abs() < 1e-9, "{key:?} {f:?}");
                    }
                }
            }
        }
    }
}

/// What `usage_sums` must answer, summed here from the rows (only the rows of tenants `h*`).
fn reference_sums(rows: &[UsageRow], key: UsageKey, f: &UsageFilter) -> Vec<UsageSum> {
    let mut m: std::collections::BTreeMap<(String, String), UsageSum> = Default::default();
    for r in rows {
        if f.tenant.as_ref().is_some_and(|t| *t != r.tenant)
            || f.session_id.as_ref().is_some_and(|s| *s != r.session_id)
            || f.from_ms.is_some_and(|t| r.ts_ms < t)
            || f.to_ms.is_some_and(|t| r.ts_ms >= t)
        {
            continue;
        }
        let k = match key {
            UsageKey::Session => &r.session_id,
            UsageKey::Box => &r.box_id,
            UsageKey::Tenant => &r.tenant,
            UsageKey::Model => &r.model,
        };
        let s = m
            .entry((k.clone(), r.model.clone()))
            .or_insert_with(|| UsageSum {
                key: k.clone(),
                model: r.model.clone(),
                ..Default::default()
            });
        s.requests += 1;
        s.input_tokens += r.input_tokens;
        s.output_tokens += r.output_tokens;
        s.cache_creation_5m_tokens += r.cache_creation_5m_tokens;
        s.cache_creation_1h_tokens += r.cache_creation_1h_tokens;
        s.cache_read_tokens += r.cache_read_tokens;
        s.cost_usd += r.cost_usd;
    }
    m.into_values().collect()
}
