//! A cluster of real nodes: three `berth serve` processes, each in a network namespace of its
//! own with its own address on a bridge this test creates (and removes), sharing a real
//! PostgreSQL and moto's S3 server (both reached at the bridge's address). Boxes spread over
//! the nodes, any node answers for any box or session, a node killed or cut off is declared
//! lost (its hybrid boxes restore elsewhere, the rest are marked lost) and, coming back, runs
//! nothing the cluster replaced; cron fires once per instant with every node scheduling.

mod cluster_harness;
mod common;

use cluster_harness::*;
use common::Api;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Boxes spread over three nodes; `GET /v1/nodes` and `berth node ls` list them; a box on one
/// node is driven through another (exec with stdin, files, a port's WebSocket, a session's
/// messages, its SSE stream read on a third node); a forged forwarding header is refused; a
/// drained node gets no boxes; cron fires once per instant with all three scheduling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_spread_and_any_node_answers() {
    let t0 = Instant::now();
    let c = Cluster::start(3).await;
    let a1 = c.api(1);
    let nodes = node_states(a1).await;
    assert_eq!(
        nodes,
        (1..=3)
            .map(|i| (format!("node{i}"), "active".to_string()))
            .collect::<Vec<_>>()
    );
    // The CLI, with the URL and key from the environment.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["node", "ls", "--json"])
        .env("BERTH_URL", &a1.url)
        .env("BERTH_TOKEN", ADMIN)
        .output()
        .await
        .expect("berth node ls");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    assert!(
        listed[1]["advertise_url"]
            .as_str()
            .is_some_and(|u| u.contains(&c.net.node_ip(2))),
        "{listed}"
    );

    // Six boxes asked of node 1 land on all three nodes.
    let mut on: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for _ in 0..6 {
        let b = new_box(a1, json!({})).await;
        on.entry(b["node"].as_str().expect("node").to_string())
            .or_default()
            .push(b["id"].as_str().expect("id").to_string());
    }
    assert_eq!(on.len(), 3, "boxes by node: {on:?}");

    // A box on node 2, driven through node 1; its records read on node 3.
    let b2 = on["node2"][0].clone();
    let r = exec(
        a1,
        &b2,
        &["/bin/sh", "-c", "cat; hostname"],
        Some("piped in"),
    )
    .await;
    assert_eq!(r["exit_code"], 0, "{r}");
    assert!(
        r["stdout"].as_str().unwrap_or("").starts_with("piped in"),
        "{r}"
    );
    let put = a1
        .raw(
            a1.http
                .put(format!("{}/v1/boxes/{b2}/files/ws.py", a1.url))
                .bearer_auth(ADMIN)
                .body(WS_ECHO),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
    let got = c.api(3).get(&format!("/v1/boxes/{b2}/files/ws.py")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes, WS_ECHO.as_bytes());
    assert_eq!(
        c.api(3).get(&format!("/v1/boxes/{b2}")).await.json["node"],
        "node2"
    );
    let s = a1
        .post(
            "/v1/sessions",
            json!({"box": b2, "agent": {"kind": "command", "argv": ["/usr/bin/python3", "/workspace/ws.py"]}}),
        )
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    assert_eq!(ws_echo(a1, &b2, "across nodes").await, "across nodes");

    // A session in node 2's box, created, messaged and streamed through the other nodes.
    let s = c
        .api(3)
        .post("/v1/sessions", json!({"box": b2, "agent": echo_agent()}))
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let sid = s.json["id"].as_str().expect("id").to_string();
    for text in ["one", "two"] {
        let r = a1
            .post(
                &format!("/v1/sessions/{sid}/messages"),
                json!({"content": text}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.json);
    }
    let evs = c.api(3).until(&sid, "stdout", 2).await;
    let outs: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    // One stdout event per line, in order.
    assert_eq!(
        outs.iter().map(|t| t.trim_end()).collect::<Vec<_>>(),
        ["echo: one", "echo: two"]
    );
    let seqs: Vec<i64> = evs.iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "gapless");
    let r = a1
        .post(&format!("/v1/sessions/{sid}/interrupt"), json!({}))
        .await;
    assert!(r.status < 500, "{} {}", r.status, r.json);

    // Claiming to be a node without the secret: refused, and the node still answers.
    let forged = a1
        .raw(
            a1.http
                .post(format!("{}/v1/boxes/{b2}/exec", c.api(2).url))
                .bearer_auth(ADMIN)
                .header("x-berth-forwarded-by", "node1")
                .header("x-berth-forwarded-at", "1")
                .header("x-berth-forwarded-sig", "00")
                .json(&json!({"argv": ["true"]})),
        )
        .await;
    assert_eq!(forged.status, 401, "{}", forged.json);
    assert_eq!(c.api(2).get("/v1/nodes").await.status, 200);
    // A tenant's key may not list or drain nodes.
    let (_, tenant) = common::tenant_key(a1, "acme").await;
    assert_eq!(tenant.get("/v1/nodes").await.status, 403);
    // A tenant cannot reach another tenant's box through another node either.
    let r = tenant
        .post(&format!("/v1/boxes/{b2}/exec"), json!({"argv": ["true"]}))
        .await;
    assert_eq!(r.status, 404, "{}", r.json);

    // Drained, node 3 gets no new boxes; undrained, it does again.
    let r = a1.post("/v1/nodes/node3/drain", json!({})).await;
    assert_eq!(
        (r.status, r.json["state"].as_str()),
        (200, Some("draining"))
    );
    for _ in 0..4 {
        let b = new_box(a1, json!({})).await;
        assert_ne!(b["node"], "node3", "{b}");
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["node", "undrain", "node3"])
        .env("BERTH_URL", &a1.url)
        .env("BERTH_TOKEN", ADMIN)
        .output()
        .await
        .expect("berth node undrain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        node_states(a1).await[2],
        ("node3".to_string(), "active".to_string())
    );

    // Cron every second with three schedulers: each instant fires once.
    let r = a1
        .post(
            "/v1/triggers",
            json!({"box": {"resources": {"cpus": 0.25, "memory_mib": 128, "disk_mib": 64}},
                   "webhook": false, "schedule": "* * * * * *",
                   "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "cat"]},
                   "prompt": "tick at {{scheduled_at}}"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let trig = r.json["id"].as_str().expect("id").to_string();
    let before: Vec<String> = session_ids(a1).await;
    // Long enough for every node's scheduler to have read the trigger (a rescan is 5 s).
    a1.wait_for(&format!("/v1/triggers/{trig}"), 40, |t| {
        t["fired"].as_u64().unwrap_or(0) >= 12
    })
    .await;
    assert_eq!(a1.delete(&format!("/v1/triggers/{trig}")).await.status, 204);
    // Firings in flight when it was deleted settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fired: Vec<String> = session_ids(a1)
        .await
        .into_iter()
        .filter(|s| !before.contains(s))
        .collect();
    assert!(fired.len() >= 12, "{fired:?}");
    let mut ticks = Vec::new();
    for sid in &fired {
        let evs = a1.until(sid, "stdout", 1).await;
        let text = evs
            .iter()
            .find(|e| e["type"] == "stdout")
            .and_then(|e| e["data"]["text"].as_str())
            .unwrap_or("")
            .trim()
            .to_string();
        assert!(text.starts_with("tick at 20"), "{text}");
        ticks.push(text);
    }
    let distinct: std::collections::BTreeSet<&String> = ticks.iter().collect();
    assert_eq!(
        distinct.len(),
        ticks.len(),
        "an instant fired twice: {ticks:?}"
    );
    // More than one node's scheduler fired (each firing's box is made where it fired).
    let mut firing_nodes = std::collections::BTreeSet::new();
    for sid in &fired {
        let s = a1.get(&format!("/v1/sessions/{sid}")).await.json;
        let b = a1
            .get(&format!("/v1/boxes/{}", s["box_id"].as_str().unwrap_or("")))
            .await
            .json;
        firing_nodes.insert(b["node"].as_str().unwrap_or("").to_string());
    }
    assert!(firing_nodes.len() >= 2, "fired only on {firing_nodes:?}");

    // A signed webhook call is taken once: replayed to another node it is refused.
    let r = a1
        .post(
            "/v1/triggers",
            json!({"box": {"resources": {"cpus": 0.25, "memory_mib": 128, "disk_mib": 64}},
                   "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "cat"]},
                   "prompt": "hook {{n}}"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let (hook_path, secret) = (
        r.json["webhook_path"].as_str().expect("path").to_string(),
        r.json["secret"].as_str().expect("secret").to_string(),
    );
    let body = json!({"n": 1}).to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string();
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret.as_bytes()).expect("key");
    hmac::Mac::update(&mut mac, format!("{ts}.{body}").as_bytes());
    let sig = format!(
        "sha256={}",
        hex::encode(hmac::Mac::finalize(mac).into_bytes())
    );
    let mut answers = Vec::new();
    for i in [1, 2, 3] {
        let api = c.api(i);
        let r = api
            .raw(
                api.http
                    .post(format!("{}{hook_path}", api.url))
                    .header("x-berth-timestamp", &ts)
                    .header("x-berth-signature-256", &sig)
                    .header("content-type", "application/json")
                    .body(body.clone()),
            )
            .await;
        answers.push(r.status);
    }
    assert_eq!(answers, [202, 401, 401], "the same call at nodes 1, 2, 3");
    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(240),
        "{:?}",
        t0.elapsed()
    );
}

async fn session_ids(api: &Api) -> Vec<String> {
    let r = api.get("/v1/sessions").await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect()
}

/// `kill -9` of the node holding a parked hybrid box and a live session: within the lease
/// (plus a renewal) the node is lost, its persistent box `lost` and its session
/// `interrupted`; the hybrid box restores on the node that serves its next use, with its
/// files, and its session resumes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_lost_and_its_hybrid_box_restores_elsewhere() {
    let t0 = Instant::now();
    let mut c = Cluster::start(3).await;
    let a1 = c.api(1).clone_api();
    let hy = new_box(&a1, json!({"lifecycle": "hybrid"})).await;
    let hid = hy["id"].as_str().expect("id").to_string();
    let holder = c.index(hy["node"].as_str().expect("node"));
    // Talk through a node other than the holder; put a persistent box on the holder too.
    let via = if holder == 1 { 2 } else { 1 };
    let api = c.api(via).clone_api();
    let put = api
        .raw(
            api.http
                .put(format!("{}/v1/boxes/{hid}/files/notes/kept.txt", api.url))
                .bearer_auth(ADMIN)
                .body("written before the crash"),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
    let s = api
        .post("/v1/sessions", json!({"box": hid, "agent": echo_agent()}))
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let hsid = s.json["id"].as_str().expect("id").to_string();
    // Parked with its (idle) session, which the restore resumes.
    api.wait_for(&format!("/v1/sessions/{hsid}"), 20, |s| {
        s["state"] == "idle"
    })
    .await;
    let parked = api.post(&format!("/v1/boxes/{hid}/park"), json!({})).await;
    assert_eq!(
        (parked.status, parked.json["state"].as_str()),
        (200, Some("parked")),
        "{}",
        parked.json
    );
    // A live session on a persistent box of the holder.
    let pb = box_on(&c, holder, json!({})).await;
    let s = api
        .post("/v1/sessions", json!({"box": pb, "agent": echo_agent()}))
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let psid = s.json["id"].as_str().expect("id").to_string();

    let killed = Instant::now();
    c.kill9(holder).await;
    let holder_name = format!("node{holder}");
    until("the killed node declared lost", 15, || {
        let api = api.clone_api();
        let holder_name = holder_name.clone();
        async move {
            node_states(&api)
                .await
                .contains(&(holder_name, "lost".to_string()))
                .then_some(())
        }
    })
    .await;
    let b = until("the hybrid box restorable", 10, || {
        let api = api.clone_api();
        let hid = hid.clone();
        async move {
            let b = api.get(&format!("/v1/boxes/{hid}")).await.json;
            (b["state"] == "parked" && b["node"].is_null()).then_some(b)
        }
    })
    .await;
    let restorable_after = killed.elapsed();
    assert!(
        restorable_after < Duration::from_millis(LEASE_MS + 3000),
        "restorable after {restorable_after:?}"
    );
    assert!(
        b["state_reason"].as_str().unwrap_or("").contains("lost"),
        "{b}"
    );
    api.wait_for(&format!("/v1/boxes/{pb}"), 10, |b| b["state"] == "lost")
        .await;
    api.wait_for(&format!("/v1/sessions/{psid}"), 10, |s| {
        s["state"] == "interrupted"
    })
    .await;

    // Its next use restores it on the node that serves it, with its files.
    let r = exec(&api, &hid, &["cat", "/workspace/notes/kept.txt"], None).await;
    assert_eq!(r["stdout"], "written before the crash", "{r}");
    let b = api.get(&format!("/v1/boxes/{hid}")).await.json;
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(b["node"], format!("node{via}"), "{b}");
    // The session the park stopped resumed there and answers.
    let r = api
        .post(
            &format!("/v1/sessions/{hsid}/messages"),
            json!({"content": "after"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    let evs = api.until(&hsid, "stdout", 1).await;
    assert!(
        evs.iter().any(|e| e["data"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("echo: after")),
        "{evs:?}"
    );
    eprintln!("node killed → hybrid box restorable: {restorable_after:?}");
    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(240),
        "{:?}",
        t0.elapsed()
    );
}

/// A node cut off from the others (its veth down) is declared lost; its parked hybrid box is
/// taken and restored by another node; the cut-off node fences itself (its running box's
/// processes end) and, connected again, rejoins under a new incarnation without running or
/// rewriting what the cluster replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_is_lost_and_does_not_double_run_when_it_returns() {
    let t0 = Instant::now();
    let c = Cluster::start(3).await;
    let a1 = c.api(1).clone_api();
    // Boxes on node 3: a hybrid one (parked below) and a persistent one with a live session.
    let hid = box_on(&c, 3, json!({"lifecycle": "hybrid"})).await;
    let pid = box_on(&c, 3, json!({})).await;
    let put = a1
        .raw(
            a1.http
                .put(format!("{}/v1/boxes/{hid}/files/state.txt", a1.url))
                .bearer_auth(ADMIN)
                .body("v1"),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
    let parked = a1.post(&format!("/v1/boxes/{hid}/park"), json!({})).await;
    assert_eq!(parked.json["state"], "parked", "{}", parked.json);
    // A live session in node 3's persistent box, its process marked for the test to find.
    let marker = format!(
        "{}.{}",
        600 + std::process::id() % 300,
        c.net.tag.len() * 7 + 1
    );
    let s = a1
        .post(
            "/v1/sessions",
            json!({"box": pid, "agent": {"kind": "command", "argv": ["/bin/sleep", marker]}}),
        )
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    assert_eq!(
        s.json["node"], "node3",
        "a session names its node: {}",
        s.json
    );
    let psid = s.json["id"].as_str().expect("id").to_string();
    let marker = format!("sleep {marker}");
    until("the marked process runs", 10, || async {
        process_with(&marker).then_some(())
    })
    .await;

    c.net.link(3, false);
    until("node 3 declared lost", 20, || {
        let a1 = a1.clone_api();
        async move {
            node_states(&a1)
                .await
                .contains(&("node3".to_string(), "lost".to_string()))
                .then_some(())
        }
    })
    .await;
    a1.wait_for(&format!("/v1/boxes/{pid}"), 10, |b| b["state"] == "lost")
        .await;
    // Settled just after the claim (boxes first, then their sessions).
    a1.wait_for(&format!("/v1/sessions/{psid}"), 10, |s| {
        s["state"] == "interrupted"
    })
    .await;
    // Cut off, node 3 fences itself within about a lease: its box's processes end.
    until("node 3 fenced its box", 20, || async {
        (!process_with(&marker)).then_some(())
    })
    .await;
    // The hybrid box is restored by node 1 and changed there.
    let r = exec(
        &a1,
        &hid,
        &["/bin/sh", "-c", "cat state.txt; echo v2 > state.txt"],
        None,
    )
    .await;
    assert_eq!(r["stdout"], "v1", "{r}");
    assert_eq!(
        a1.get(&format!("/v1/boxes/{hid}")).await.json["node"],
        "node1"
    );

    c.net.link(3, true);
    let n3 = until("node 3 back", 20, || {
        let a1 = a1.clone_api();
        async move {
            let r = a1.get("/v1/nodes").await.json;
            r["items"]
                .as_array()
                .and_then(|a| a.iter().find(|n| n["name"] == "node3").cloned())
                .filter(|n| n["state"] == "active")
        }
    })
    .await;
    assert!(n3["incarnation"].as_i64().unwrap_or(0) >= 2, "{n3}");
    // Some renewals later nothing was taken back or rewritten.
    tokio::time::sleep(Duration::from_millis(LEASE_MS)).await;
    let h = a1.get(&format!("/v1/boxes/{hid}")).await.json;
    assert_eq!(
        (h["node"].as_str(), h["state"].as_str()),
        (Some("node1"), Some("running")),
        "{h}"
    );
    let p = c.api(3).get(&format!("/v1/boxes/{pid}")).await.json;
    assert_eq!(p["state"], "lost", "{p}");
    // Nor the session it ran: the cluster settled it (no node holds it now), so node 3's late
    // writes (its agent's end, recorded as it fenced, reaching the store once it is back)
    // are refused by the store.
    let ps = a1.get(&format!("/v1/sessions/{psid}")).await.json;
    assert_eq!(
        (ps["state"].as_str(), ps.get("node")),
        (Some("interrupted"), None),
        "{ps}"
    );
    assert!(!process_with(&marker));
    let r = exec(&c.api(3).clone_api(), &hid, &["cat", "state.txt"], None).await;
    assert_eq!(
        r["stdout"], "v2\n",
        "served by its new node through node 3: {r}"
    );
    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(240),
        "{:?}",
        t0.elapsed()
    );
}

/// A rolling restart of the three nodes, each drained first (its hybrid boxes park), restarted
/// and undrained: every event committed before is still in each session's log, gapless; the
/// sessions resume at their next message; and no node runs a box the store does not give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_event_and_leaks_no_box() {
    let t0 = Instant::now();
    let mut c = Cluster::start(3).await;
    let a1 = c.api(1).clone_api();
    let mut sessions = Vec::new();
    for i in 1..=3 {
        let b = box_on(&c, i, json!({"lifecycle": "hybrid"})).await;
        let s = a1
            .post("/v1/sessions", json!({"box": b, "agent": echo_agent()}))
            .await;
        assert_eq!(s.status, 201, "{}", s.json);
        let sid = s.json["id"].as_str().expect("id").to_string();
        a1.wait_for(&format!("/v1/sessions/{sid}"), 20, |s| s["state"] == "idle")
            .await;
        sessions.push((b, sid));
    }
    let mut committed = Vec::new();
    for (_, sid) in &sessions {
        let s = a1.get(&format!("/v1/sessions/{sid}")).await.json;
        committed.push(s["last_seq"].as_i64().expect("seq"));
    }
    for i in 1..=3 {
        let r = a1
            .post(&format!("/v1/nodes/node{i}/drain"), json!({}))
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
        // Draining parks the node's hybrid box.
        let (b, _) = &sessions[i - 1];
        a1.wait_for(&format!("/v1/boxes/{b}"), 30, |b| b["state"] == "parked")
            .await;
        c.restart(i).await;
        let r = a1
            .post(&format!("/v1/nodes/node{i}/undrain"), json!({}))
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
        until("the restarted node active", 20, || {
            let api = a1.clone_api();
            async move {
                node_states(&api)
                    .await
                    .contains(&(format!("node{i}"), "active".to_string()))
                    .then_some(())
            }
        })
        .await;
    }
    for ((_, sid), last) in sessions.iter().zip(&committed) {
        let r = a1
            .post(
                &format!("/v1/sessions/{sid}/messages"),
                json!({"content": "after the restarts"}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.json);
        let evs = a1.until(sid, "stdout", 1).await;
        let seqs: Vec<i64> = evs.iter().filter_map(|e| e["seq"].as_i64()).collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{sid}");
        assert!(seqs.len() as i64 > *last, "{sid}: {seqs:?}");
    }
    // Every node runs exactly the boxes the store gives it (read after a renewal).
    tokio::time::sleep(Duration::from_millis(LEASE_MS / 2)).await;
    let boxes = a1.get("/v1/boxes").await.json;
    let nodes = a1.get("/v1/nodes").await.json;
    for n in nodes["items"].as_array().expect("items") {
        let name = n["name"].as_str().unwrap_or("");
        let held = boxes["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|b| b["node"] == name && b["state"] == "running")
            .count();
        assert_eq!(n["load"]["boxes"].as_u64(), Some(held as u64), "{n}");
    }
    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(300),
        "{:?}",
        t0.elapsed()
    );
}

/// A server on its own (SQLite) is a one-node cluster: it lists itself, active, under the host
/// name, with its backends and the boxes it holds; its boxes name it.
#[tokio::test]
async fn a_single_server_is_a_one_node_cluster() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = common::Server::start(dir.path()).await;
    let api = srv.client();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    let b = new_box(&api, json!({})).await;
    assert_eq!(b["node"], host.as_str(), "{b}");
    let nodes = until("the node's load renewed", 20, || {
        let api = api.clone_api();
        async move {
            let r = api.get("/v1/nodes").await.json;
            (r["items"][0]["load"]["boxes"] == 1).then_some(r)
        }
    })
    .await;
    let items = nodes["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{nodes}");
    assert_eq!(items[0]["name"], host.as_str());
    assert_eq!(items[0]["state"], "active");
    assert_eq!(items[0]["advertise_url"], srv.url.as_str());
    assert!(items[0]["backends"]
        .as_array()
        .is_some_and(|b| b.iter().any(|x| x == "native")));
    srv.stop().await;
}
