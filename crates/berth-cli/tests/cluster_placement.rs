//! Placement on a cluster of real nodes (see `cluster_harness`: node 1 and 2 carry `zone=a`,
//! node 3 `zone=b`, each `host=<its name>`): labels are registered and listed, a box's
//! `placement.node_selector` picks its node wherever it was asked, `placement.spread_by`
//! spreads a tenant's boxes over a label's values (simultaneous creates through one node too),
//! a selector nothing matches is a 409; the boxes of cron and webhook triggers and of Managed
//! Agents sessions (their environment's `config.placement`) are placed the same way; and a
//! port link made through one node opens its port through any node, until its key is deleted
//! on any node.

mod cluster_harness;
mod common;

use cluster_harness::*;
use common::{tenant_key, Api};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `berth <args>` against `api`'s node with its key; its stdout.
async fn cli(api: &Api, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env("BERTH_URL", &api.url)
        .env("BERTH_TOKEN", &api.token)
        .output()
        .await
        .expect("berth");
    assert!(
        out.status.success(),
        "berth {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn zone(node: &str) -> &'static str {
    if node == "node3" {
        "b"
    } else {
        "a"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_follow_node_labels_and_port_links_open_on_every_node() {
    let t0 = Instant::now();
    let c = Cluster::start(3).await;
    let a1 = c.api(1);

    // Each node's labels, as registered, in `GET /v1/nodes` and `berth node ls`.
    let nodes = a1.get("/v1/nodes").await.json;
    let labels: Vec<Value> = nodes["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| n["labels"].clone())
        .collect();
    assert_eq!(
        labels,
        (1..=3)
            .map(|i| json!({"zone": zone(&format!("node{i}")), "host": format!("node{i}")}))
            .collect::<Vec<_>>(),
        "{nodes}"
    );
    let ls = cli(a1, &["node", "ls"]).await;
    assert!(
        ls.lines().next().is_some_and(|h| h.contains("LABELS")),
        "{ls}"
    );
    assert!(
        ls.lines()
            .any(|l| l.starts_with("node3") && l.contains("host=node3,zone=b")),
        "{ls}"
    );

    // A tenant of its own: the spread counts its boxes only.
    let (_, t) = tenant_key(a1, "placer").await;
    // Asked of node 1, a box for zone b runs on node 3 and says what it asked.
    let b = new_box(&t, json!({"placement": {"node_selector": {"zone": "b"}}})).await;
    assert_eq!(b["node"], "node3", "{b}");
    assert_eq!(
        b["placement"],
        json!({"node_selector": {"zone": "b"}}),
        "{b}"
    );
    // Nothing matches: 409 naming the selector, on any node, and no box made.
    for i in [1, 3] {
        let (_, ti) = tenant_key(c.api(i), "placer").await;
        let r = ti
            .post(
                "/v1/boxes",
                json!({"placement": {"node_selector": {"zone": "c"}}}),
            )
            .await;
        assert_eq!(r.status, 409, "{}", r.json);
        let msg = r.json.to_string();
        assert!(
            msg.contains("node_selector") && msg.contains("zone"),
            "{msg}"
        );
    }
    assert_eq!(
        t.get("/v1/boxes").await.json["items"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // Spread by zone (the CLI, through node 1): zone b holds one of the tenant's boxes, so
    // the next goes to zone a, and after three the two zones hold two each (without the
    // spread, the fewest boxes would put three in zone a: two nodes there, one in b).
    let mut per_zone = std::collections::BTreeMap::from([("a", 0), ("b", 1)]);
    for k in 0..3 {
        let out = cli(
            &t,
            &[
                "create",
                "--spread-by",
                "zone",
                "--cpus",
                "0.25",
                "--memory-mib",
                "128",
                "--disk-mib",
                "64",
                "--json",
            ],
        )
        .await;
        let b: Value = serde_json::from_str(&out).expect("box json");
        assert_eq!(b["placement"], json!({"spread_by": "zone"}), "{b}");
        let z = zone(b["node"].as_str().expect("node"));
        if k == 0 {
            assert_eq!(z, "a", "the zone with fewer of the tenant's boxes: {b}");
        }
        *per_zone.entry(z).or_default() += 1;
    }
    assert_eq!(per_zone, [("a", 2), ("b", 2)].into(), "boxes per zone");
    // Simultaneous creates through one node see each other's placements (in flight until
    // each create answered): eight at once for a tenant with no boxes end four per zone
    // (reading only the store, each would see no box anywhere and all go to one zone).
    let (_, sp) = tenant_key(a1, "spreader").await;
    let made = futures::future::join_all(
        (0..8).map(|_| new_box(&sp, json!({"placement": {"spread_by": "zone"}}))),
    )
    .await;
    let mut per_zone = std::collections::BTreeMap::<&str, u32>::new();
    for b in &made {
        *per_zone
            .entry(zone(b["node"].as_str().expect("node")))
            .or_default() += 1;
    }
    assert_eq!(
        per_zone,
        [("a", 4), ("b", 4)].into(),
        "concurrent creates per zone"
    );
    // The CLI's selector.
    let out = cli(
        &t,
        &[
            "create",
            "--node-selector",
            "host=node2",
            "--cpus",
            "0.25",
            "--memory-mib",
            "128",
            "--json",
        ],
    )
    .await;
    let b: Value = serde_json::from_str(&out).expect("box json");
    assert_eq!(b["node"], "node2", "{b}");

    // A port link: a box on node 2 serving HTTP, the link made through node 1, opened
    // through each node (without a key), then refused everywhere once the key is deleted.
    let (kid, l) = tenant_key(a1, "linker").await;
    let bx = new_box(
        &l,
        json!({"placement": {"node_selector": {"host": "node2"}}}),
    )
    .await;
    let bx = bx["id"].as_str().expect("id").to_string();
    let put = l
        .raw(
            l.http
                .put(format!("{}/v1/boxes/{bx}/files/hello.txt", l.url))
                .bearer_auth(&l.token)
                .body("hello from node 2"),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
    let s = l
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": {"kind": "command",
                "argv": ["/usr/bin/python3", "-m", "http.server", "8000", "--directory", "/workspace"]}}),
        )
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let link = l
        .post(&format!("/v1/boxes/{bx}/port-links"), json!({"port": 8000}))
        .await;
    assert_eq!(link.status, 201, "{}", link.json);
    let path = link.json["url"].as_str().expect("url").to_string();
    let http = reqwest::Client::new();
    for i in [3, 1, 2] {
        let url = format!("{}{path}hello.txt", c.api(i).url);
        let body = until(&format!("the link through node {i}"), 30, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(&url).send().await.ok()?;
                if r.status() == 401 {
                    panic!("the link through node {i} was refused");
                }
                if !r.status().is_success() {
                    return None;
                }
                r.text().await.ok()
            }
        })
        .await;
        assert_eq!(body, "hello from node 2", "through node {i}");
    }
    let r = a1.delete(&format!("/v1/keys/{kid}")).await;
    assert!(r.status == 204 || r.status == 200, "{}", r.json);
    for i in [3, 2, 1] {
        let r = http
            .get(format!("{}{path}hello.txt", c.api(i).url))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 401, "the deleted key's link through node {i}");
    }

    // Boxes the engine makes are placed too: a cron trigger's and a webhook's box for zone b
    // run on node 3, whichever node fires them (the winner of each cron instant has node 3
    // start the session, a node-signed call), with no firing failed.
    let (_, tc) = tenant_key(a1, "crons").await;
    let zone_b = json!({"resources": {"cpus": 0.25, "memory_mib": 128, "disk_mib": 64},
                        "placement": {"node_selector": {"zone": "b"}}});
    let r = tc
        .post(
            "/v1/triggers",
            json!({"box": zone_b, "webhook": false, "schedule": "* * * * * *",
                   "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "cat"]},
                   "prompt": "tick"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let cron = r.json["id"].as_str().expect("id").to_string();
    // Long enough for every node's scheduler to have read the trigger (a rescan is 5 s).
    let fired = tc
        .wait_for(&format!("/v1/triggers/{cron}"), 40, |t| {
            t["fired"].as_u64().unwrap_or(0) >= 8
        })
        .await;
    assert_eq!(tc.delete(&format!("/v1/triggers/{cron}")).await.status, 204);
    assert!(fired["last_error"].is_null(), "{fired}");
    let r = tc
        .post(
            "/v1/triggers",
            json!({"box": zone_b, "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "cat"]},
                   "prompt": "hook"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let (hook_path, secret) = (
        r.json["webhook_path"].as_str().expect("path").to_string(),
        r.json["secret"].as_str().expect("secret").to_string(),
    );
    let hooked = a1
        .raw(
            a1.http
                .post(format!("{}{hook_path}", a1.url))
                .bearer_auth(&secret)
                .header("content-type", "application/json")
                .body("{}"),
        )
        .await;
    assert_eq!(hooked.status, 202, "{}", hooked.json);
    let sessions = tc.get("/v1/sessions").await.json;
    let sessions = sessions["items"].as_array().expect("items").clone();
    assert!(sessions.len() >= 9, "{sessions:?}");
    for s in &sessions {
        let b = tc
            .get(&format!("/v1/boxes/{}", s["box_id"].as_str().expect("box")))
            .await;
        assert_eq!(b.json["node"], "node3", "{}", b.json);
    }
    assert!(
        sessions
            .iter()
            .any(|s| s["id"] == hooked.json["session_id"]),
        "the webhook's session"
    );

    // A Managed Agents session whose environment asks for zone b: created through node 1, it
    // runs on node 3, and is driven through node 2 (its events forwarded to node 3).
    let (_, m) = tenant_key(a1, "managed").await;
    let ma = |i: usize| Api::new(&format!("{}/anthropic", c.api(i).url), &m.token);
    let agent = ma(1)
        .post("/v1/agents", json!({"name": "a", "model": "claude-x"}))
        .await;
    assert_eq!(agent.status, 200, "{}", agent.json);
    let env = ma(1)
        .post(
            "/v1/environments",
            json!({"name": "zone-b", "config": {"type": "cloud",
                   "placement": {"node_selector": {"zone": "b"}}}}),
        )
        .await;
    assert_eq!(env.status, 200, "{}", env.json);
    assert_eq!(
        env.json["config"]["placement"],
        json!({"node_selector": {"zone": "b"}}),
        "{}",
        env.json
    );
    let s = ma(1)
        .post(
            "/v1/sessions",
            json!({"agent": agent.json["id"], "environment_id": env.json["id"]}),
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.json);
    let sid = s.json["id"].as_str().expect("id").to_string();
    let boxes = m.get("/v1/boxes").await.json;
    let boxes = boxes["items"].as_array().expect("items");
    assert_eq!(boxes.len(), 1, "{boxes:?}");
    assert_eq!(boxes[0]["node"], "node3", "{}", boxes[0]);
    let r = ma(2)
        .post(
            &format!("/v1/sessions/{sid}/events"),
            json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "hello"}]}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    until("the agent's answer, read through node 1", 60, || {
        let a = ma(1);
        let path = format!("/v1/sessions/{sid}/events?types[]=agent.message");
        async move {
            let l = a.get(&path).await.json;
            (l["data"].as_array().map(Vec::len) >= Some(1)).then_some(())
        }
    })
    .await;

    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(180),
        "{:?}",
        t0.elapsed()
    );
}
