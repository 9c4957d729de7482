//! Warm pools, review 6: a pool serves only requests for what it holds (an ephemeral box of
//! its spec), a taken box idles out as its spec says, `berth.*` labels are the server's own,
//! and the start-up sweep only destroys a previous run's ready pool boxes, and only when pools
//! are configured.

mod common;

use common::{Api, Server};
use serde_json::{json, Value};
use std::path::Path;

/// A command agent (cheaper than a CLI start; the pool logic is the same for every agent).
const AGENT: &str = "{kind = \"command\", argv = [\"/bin/sh\", \"-c\", \"exec cat\"]}";

fn agent_json() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c", "exec cat"]})
}

fn pool(name: &str, extra_box: &str) -> String {
    format!(
        "{{name = \"{name}\", size = 1, box = {{resources = {{memory_mib = 256, disk_mib = 64}}{extra_box}}}, agent = {AGENT}}}"
    )
}

async fn start(data: &Path, env: &[(&str, &str)]) -> Server {
    let mut all = vec![("BERTH_DOCKER", "1")];
    all.extend_from_slice(env);
    Server::start_with(data, &all).await
}

/// The pool's entry in `GET /v1/pools` once `pred` holds (bounded).
async fn pool_when(api: &Api, name: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
    let v = api
        .wait_for("/v1/pools", secs, |j| {
            j["items"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["name"] == name))
                .is_some_and(&pred)
        })
        .await;
    v["items"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .cloned()
        .expect("pool listed")
}

/// The one running box the pool made.
async fn ready_box(api: &Api, name: &str) -> String {
    pool_when(api, name, 90, |p| p["ready"] == 1).await;
    let r = api.get("/v1/boxes").await;
    assert_eq!(r.status, 200, "{}", r.json);
    let ids: Vec<String> = r.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|b| b["labels"]["berth.pool"] == name && b["state"] == "running")
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids[0].clone()
}

/// M1: a persistent or hybrid request with the pool's resources and agent starts cold in the
/// lifecycle it asked for; naming the pool with another box spec is refused; only a request
/// for an ephemeral box of the pool's spec takes the ready box.
#[tokio::test]
async fn a_pool_serves_only_ephemeral_requests_of_its_spec() {
    let dir = tempfile::tempdir().expect("tmp");
    let pools = format!("[{}]", pool("p", ""));
    let srv = start(dir.path(), &[("BERTH_POOLS", pools.as_str())]).await;
    let api = srv.client();
    let ready = ready_box(&api, "p").await;
    let resources = json!({"memory_mib": 256, "disk_mib": 64});

    for lifecycle in ["persistent", "hybrid"] {
        let r = api
            .post(
                "/v1/sessions",
                json!({"box": {"resources": resources, "lifecycle": lifecycle}, "agent": agent_json()}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.json);
        let bx = r.json["box_id"].as_str().expect("box").to_string();
        assert_ne!(
            bx, ready,
            "a {lifecycle} request took the ephemeral pool box"
        );
        let b = api.get(&format!("/v1/boxes/{bx}")).await;
        assert_eq!(b.json["lifecycle"], lifecycle, "{}", b.json);
    }
    // A shared box is never a pool's either.
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"resources": resources, "shared": true}, "agent": agent_json()}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_ne!(r.json["box_id"], ready.as_str());

    // Naming the pool with another lifecycle or agent: refused, not silently dropped.
    let r = api
        .post(
            "/v1/sessions",
            json!({"pool": "p", "box": {"resources": resources, "lifecycle": "persistent"}}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("omit box"),
        "{}",
        r.json
    );
    let r = api
        .post(
            "/v1/sessions",
            json!({"pool": "p", "agent": {"kind": "command", "argv": ["/bin/true"]}}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    let p = pool_when(&api, "p", 5, |p| p["ready"] == 1).await;
    assert_eq!(p["taken"], 0, "{p}");

    // The pool's own spec (lifecycle unsaid, or said ephemeral): the ready box.
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"resources": resources, "lifecycle": "ephemeral"}, "agent": agent_json()}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["box_id"], ready.as_str());
    pool_when(&api, "p", 5, |p| p["taken"] == 1).await;
    srv.stop().await;
}

/// M1: a taken box gets the idle timeout of a box of its spec (the server's ephemeral default,
/// or the pool spec's own) and idles out; while ready it had none.
#[tokio::test]
async fn a_taken_pool_box_idles_out_as_its_spec_says() {
    let dir = tempfile::tempdir().expect("tmp");
    let pools = format!(
        "[{}, {}]",
        pool("d", ""),
        pool("own", ", idle_timeout_s = 7")
    );
    let srv = start(
        dir.path(),
        &[
            ("BERTH_POOLS", pools.as_str()),
            ("BERTH_IDLE_TIMEOUT_S", "3"),
        ],
    )
    .await;
    let api = srv.client();
    let d = ready_box(&api, "d").await;
    let own = ready_box(&api, "own").await;
    let b = api.get(&format!("/v1/boxes/{d}")).await;
    assert_eq!(b.json["idle_timeout_s"], Value::Null, "ready: {}", b.json);

    let r = api.post("/v1/sessions", json!({"pool": "own"})).await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["box_id"], own.as_str());
    let b = api.get(&format!("/v1/boxes/{own}")).await;
    assert_eq!(b.json["idle_timeout_s"], 7, "{}", b.json);

    let r = api.post("/v1/sessions", json!({"pool": "d"})).await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["box_id"], d.as_str());
    let b = api.get(&format!("/v1/boxes/{d}")).await;
    assert_eq!(b.json["idle_timeout_s"], 3, "{}", b.json);
    // Nobody uses it: it stops on its idle deadline, as a cold ephemeral box would (its
    // session then ends and the box is recorded destroyed; the stop is in its events).
    api.wait_for(&format!("/v1/boxes/{d}"), 60, |b| {
        b["state"] == "stopped" || b["state"] == "destroyed"
    })
    .await;
    let evs = api.get(&format!("/v1/boxes/{d}/events")).await.json;
    let stops: Vec<&Value> = evs["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["type"] == "state" && e["data"]["state"] == "stopped")
        .collect();
    assert_eq!(stops.len(), 1, "{evs}");
    assert_eq!(stops[0]["data"]["reason"], "idle_timeout", "{evs}");
    srv.stop().await;
}

/// M2: `berth.*` labels are the server's: a client's box spec (its own box or a session's)
/// carrying one is refused with a 400 that says why.
#[tokio::test]
async fn reserved_labels_are_refused_in_client_box_specs() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(dir.path(), &[]).await;
    let api = srv.client();
    let (_id, tenant) = common::tenant_key(&api, "someone").await;
    let spec =
        |labels: Value| json!({"resources": {"memory_mib": 256, "disk_mib": 64}, "labels": labels});

    let r = tenant
        .post("/v1/boxes", spec(json!({"berth.pool": "p"})))
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    let msg = r.json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("reserved") && msg.contains("berth.pool"),
        "{}",
        r.json
    );
    let r = tenant
        .post(
            "/v1/sessions",
            json!({"box": spec(json!({"berth.anything": "x"})), "agent": agent_json()}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);
    let r = tenant.get("/v1/boxes").await;
    assert_eq!(
        r.json["items"].as_array().map(Vec::len),
        Some(0),
        "{}",
        r.json
    );

    // Other labels still work.
    let r = tenant.post("/v1/boxes", spec(json!({"team": "p"}))).await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["labels"]["team"], "p");
    srv.stop().await;
}

/// Add a label to a box's stored record, as a client could before `berth.*` was reserved.
async fn label_record(data: &Path, box_id: &str, key: &str, value: &str) {
    let n = match common::test_database(data).await {
        Some(url) => {
            let pool = sqlx::PgPool::connect(&url).await.expect("pg");
            sqlx::query(
                "UPDATE boxes SET doc = jsonb_set(doc::jsonb, ARRAY['labels', $1], to_jsonb($2::text))::text WHERE id = $3",
            )
            .bind(key)
            .bind(value)
            .bind(box_id)
            .execute(&pool)
            .await
            .expect("update")
            .rows_affected()
        }
        None => {
            let url = format!("sqlite://{}", data.join("berth.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
            sqlx::query("UPDATE boxes SET doc = json_set(doc, '$.labels.\"' || ?1 || '\"', ?2) WHERE id = ?3")
                .bind(key)
                .bind(value)
                .bind(box_id)
                .execute(&pool)
                .await
                .expect("update")
                .rows_affected()
        }
    };
    assert_eq!(n, 1, "the box's record was updated");
}

/// M2: the start-up sweep does not run without pools (a ready box a previous run left is taken
/// back, not destroyed); with pools it destroys that ready box but not a tenant's persistent
/// box whose record carries `berth.pool` (set before the prefix was reserved).
#[tokio::test]
async fn the_start_up_sweep_needs_pools_and_spares_what_is_not_a_ready_pool_box() {
    let dir = tempfile::tempdir().expect("tmp");
    let pools = format!(
        "[{{name = \"k\", size = 1, box = {{backend = \"docker\", resources = {{memory_mib = 256, disk_mib = 64}}}}, agent = {AGENT}}}]"
    );
    let with_pools = [("BERTH_POOLS", pools.as_str())];

    // Run 1: a ready pool box and a tenant's persistent box, both on Docker (they outlive a
    // crash).
    let srv = start(dir.path(), &with_pools).await;
    let api = srv.client();
    let ready = ready_box(&api, "k").await;
    let (_id, tenant) = common::tenant_key(&api, "someone").await;
    let r = tenant
        .post(
            "/v1/boxes",
            json!({"backend": "docker", "lifecycle": "persistent", "resources": {"memory_mib": 256, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let mine = r.json["id"].as_str().expect("id").to_string();
    srv.kill9().await;

    // Run 2, no pools: nothing is swept.
    let srv = start(dir.path(), &[]).await;
    let api = srv.client();
    let b = api.get(&format!("/v1/boxes/{ready}")).await;
    assert_eq!(
        b.json["state"], "running",
        "swept without pools: {}",
        b.json
    );
    let as_tenant = Api::new(&api.url, &tenant.token);
    let b = as_tenant.get(&format!("/v1/boxes/{mine}")).await;
    assert_eq!(b.json["state"], "running", "{}", b.json);
    srv.kill9().await;

    // Run 3, pools again: the leftover ready box goes; the tenant's box stays although its
    // record carries the pool label.
    label_record(dir.path(), &mine, "berth.pool", "k").await;
    let srv = start(dir.path(), &with_pools).await;
    let api = srv.client();
    let b = api
        .wait_for(&format!("/v1/boxes/{ready}"), 60, |b| {
            b["state"] != "running" && b["state"] != "creating"
        })
        .await;
    assert_eq!(b["state"], "destroyed", "the leftover ready box: {b}");
    let as_tenant = Api::new(&api.url, &tenant.token);
    let b = as_tenant.get(&format!("/v1/boxes/{mine}")).await;
    assert_eq!(b.json["state"], "running", "{}", b.json);
    assert_eq!(b.json["labels"]["berth.pool"], "k", "{}", b.json);
    let out = common::exec_sh(&as_tenant, &mine, "echo alive", 20).await;
    assert_eq!(out["stdout"], "alive\n", "{out}");
    let r = as_tenant.delete(&format!("/v1/boxes/{mine}")).await;
    assert_eq!(r.status, 200, "{}", r.json);
    srv.stop().await;
}
