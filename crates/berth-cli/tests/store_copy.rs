//! `berth store copy`: a real server's SQLite store (a session with 10,000 events, keys,
//! boxes, usage rows, container time) moved to PostgreSQL by the real binary; run again it adds
//! nothing, after an interruption it finishes the job, and a server on the copy serves the same
//! history to the same key.

mod common;

use berth_store::testing::PgCluster;
use berth_store::{Store, UsageFilter, UsageKey};
use common::Server;
use serde_json::json;
use std::process::Output;

/// The target's URL carries the cluster's password: it goes in `BERTH_DATABASE_URL`, not on the
/// command line (where `ps` would show it).
fn copy(from: &str, to: &str) -> Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["store", "copy", "--from", from])
        .env("BERTH_DATABASE_URL", to)
        .output()
        .expect("berth store copy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `<table>: <read> rows, <new> new` line of a copy's report.
fn counts(out: &Output, table: &str) -> (u64, u64) {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{table}: ")))
        .unwrap_or_else(|| panic!("no {table} line in {text}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[tokio::test]
async fn store_copy_moves_ten_thousand_events_idempotently_and_resumably() {
    let (admin, _cluster) = match std::env::var("BERTH_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => (u, None),
        _ => {
            let c = PgCluster::start().expect("test PostgreSQL");
            (c.url(), Some(c))
        }
    };
    let target = berth_store::postgres::ensure_database(
        &admin,
        &format!("copy_target_{}", std::process::id()),
    )
    .await
    .expect("database");

    // A real install on SQLite: a session whose agent prints 10,000 lines.
    let data = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        data.path(),
        &[
            (
                "BERTH_DATABASE_URL",
                &format!("sqlite://{}", data.path().join("berth.db").display()),
            ),
            ("BERTH_EVENTS_PER_SECOND", "1000000"),
            ("BERTH_EVENTS_BURST", "1000000"),
        ],
    )
    .await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64, "pids": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "seq 1 10000"]}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    let before = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, usize::MAX)
        .await;
    let lines = before.iter().filter(|e| e["type"] == "stdout").count();
    assert_eq!(lines, 10_000);
    let (_, tenant_api) = common::tenant_key(&api, "acme").await;
    assert_eq!(tenant_api.get("/v1/boxes").await.status, 200);
    srv.stop().await;

    // Usage rows and container time beside them (as the gateway and the ledger write them).
    let db = data.path().join("berth.db");
    let sqlite = berth_store::SqliteStore::open(&db).await.expect("sqlite");
    let rows: Vec<berth_store::UsageRow> = (0..1500)
        .map(|i| berth_store::UsageRow {
            ts: "2026-11-29T12:00:00Z".into(),
            ts_ms: 1_795_953_600_000 + i,
            tenant: if i % 3 == 0 { "acme" } else { "default" }.into(),
            box_id: bx.clone(),
            session_id: sid.clone(),
            model: format!("m{}", i % 4),
            status: 200,
            input_tokens: i as u64,
            output_tokens: 2 * i as u64,
            cost_usd: i as f64 / 1e4,
            ..Default::default()
        })
        .collect();
    sqlite.record_usage(&rows).await.expect("usage");
    let sums = sqlite
        .usage_sums(UsageKey::Model, &UsageFilter::default())
        .await
        .expect("sums");
    let spans = sqlite
        .box_spans(None, None, None, None)
        .await
        .expect("spans");
    assert!(!spans.is_empty(), "the box ran");
    sqlite.close().await;

    let from = format!("sqlite://{}", db.display());
    let t = std::time::Instant::now();
    let first = copy(&from, &target);
    let took = t.elapsed();
    let events = before.len() as u64;
    assert_eq!(counts(&first, "events"), (events, events));
    assert_eq!(counts(&first, "usage"), (1500, 1500));
    assert_eq!(counts(&first, "api_keys"), (2, 2));
    let progress = String::from_utf8_lossy(&first.stderr);
    assert!(
        progress.contains(&format!("events: {events}/{events}")),
        "{progress}"
    );
    assert!(
        took < std::time::Duration::from_secs(60),
        "copy took {took:?}"
    );

    // Again: nothing new.
    let again = copy(&from, &target);
    assert_eq!(counts(&again, "events"), (events, 0));
    assert_eq!(counts(&again, "usage"), (1500, 0));

    // Interrupted half-way (the later half of the log and of the usage missing): finished by
    // running it again.
    let pg = berth_store::PostgresStore::open(&target).await.expect("pg");
    let gone = sqlx::query("DELETE FROM events WHERE seq > 5000")
        .execute(pg.pool())
        .await
        .expect("delete")
        .rows_affected();
    sqlx::query("DELETE FROM usage WHERE id > 700")
        .execute(pg.pool())
        .await
        .expect("delete");
    let resumed = copy(&from, &target);
    assert_eq!(counts(&resumed, "events"), (events, gone));
    assert_eq!(counts(&resumed, "usage"), (1500, 800));

    // The copy answers as the original did.
    // (Float sums in another order differ in the last bits: costs compared to 1e-9 USD.)
    let rounded = |v: Vec<berth_store::UsageSum>| {
        v.into_iter()
            .map(|mut s| {
                s.cost_usd = (s.cost_usd * 1e9).round();
                s
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rounded(
            pg.usage_sums(UsageKey::Model, &UsageFilter::default())
                .await
                .expect("sums")
        ),
        rounded(sums)
    );
    assert_eq!(
        pg.box_spans(None, None, None, None).await.expect("spans"),
        spans
    );
    // A new usage row gets an id after the copied ones.
    pg.record_usage(&rows[..1]).await.expect("a new row");
    pg.close().await;

    let data_b = tempfile::tempdir().expect("tmp");
    std::fs::write(data_b.path().join("admin.key"), srv_admin(&data)).expect("key");
    let srv = Server::start_with(data_b.path(), &[("BERTH_DATABASE_URL", &target)]).await;
    let api = srv.client();
    let after = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, usize::MAX)
        .await;
    assert_eq!(after, before, "the same history, event for event");
    let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
    assert_eq!(s["last_seq"].as_u64(), Some(events), "{s}");
    assert_eq!(
        tenant_api_on(&srv, &tenant_api.token)
            .get("/v1/boxes")
            .await
            .status,
        200,
        "the tenant's key still works"
    );
    srv.stop().await;
}

fn srv_admin(data: &tempfile::TempDir) -> String {
    std::fs::read_to_string(data.path().join("admin.key")).expect("admin key")
}

fn tenant_api_on(srv: &Server, token: &str) -> common::Api {
    common::Api::new(&srv.url, token)
}
