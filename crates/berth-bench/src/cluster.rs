//! A three-node cluster on this machine (each node a process of its own on loopback, one
//! PostgreSQL, snapshots in a shared directory): what forwarding adds to an exec and to a
//! port's time to first byte (the same box asked directly of its node and through another),
//! what placement costs on a create, and how long after a node's `kill -9` its parked hybrid
//! box is restorable elsewhere.

use crate::{ms, percentile, BenchApi};
use serde_json::json;
use std::time::{Duration, Instant};

const ADMIN: &str = "berth_bench_cluster_admin_key_0123456789";
const SECRET: &str = "bench-cluster-secret";

/// One node (run as `berth-bench cluster-node`): a server on loopback until killed.
pub async fn node(
    data_dir: std::path::PathBuf,
    name: String,
    db: String,
    snapshots: String,
    lease_ms: u64,
) -> anyhow::Result<()> {
    let cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir,
        admin_key: Some(ADMIN.into()),
        database_url: Some(db),
        snapshot_url: Some(snapshots),
        node_name: Some(name),
        cluster_secret: Some(SECRET.into()),
        node_lease_ms: lease_ms,
        ..Default::default()
    };
    let (url, _key, _stop, server) = crate::start_server(cfg).await?;
    println!("{url}");
    server.await?;
    Ok(())
}

struct Node {
    api: BenchApi,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

async fn spawn(name: &str, db: &str, snapshots: &str, lease_ms: u64) -> anyhow::Result<Node> {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("cluster-node")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--name", name, "--db", db, "--snapshots", snapshots])
        .args(["--lease-ms", &lease_ms.to_string()])
        .env("BERTH_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let url = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await??
        .ok_or_else(|| anyhow::anyhow!("node {name} exited"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Node {
        api: BenchApi::new(url.trim(), ADMIN),
        child,
        _dir: dir,
    })
}

/// Median and p90 of `v` in ms.
fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (percentile(&v, 0.5), percentile(&v, 0.9))
}

async fn get_ttfb(api: &BenchApi, path: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let r = api
        .http
        .get(format!("{}{path}", api.url))
        .bearer_auth(&api.key)
        .send()
        .await?;
    let d = t.elapsed();
    anyhow::ensure!(r.status().is_success(), "{path}: {}", r.status());
    let _ = r.bytes().await?;
    Ok(d)
}

async fn timed_exec(api: &BenchApi, id: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    api.post(
        &format!("/v1/boxes/{id}/exec"),
        json!({"argv": ["/bin/true"]}),
    )
    .await?;
    Ok(t.elapsed())
}

/// Drain every node but `keep` (so a create through any node lands on `keep`), or undrain all.
async fn only(api: &BenchApi, keep: Option<&str>) -> anyhow::Result<()> {
    for n in ["bench1", "bench2", "bench3"] {
        let verb = if keep.is_some_and(|k| k != n) {
            "drain"
        } else {
            "undrain"
        };
        api.post(&format!("/v1/nodes/{n}/{verb}"), json!({}))
            .await?;
    }
    Ok(())
}

/// `placement`'s mean from the node's own histogram (sum / count, seconds).
async fn placement_mean(api: &BenchApi) -> anyhow::Result<(f64, u64)> {
    let text = api
        .http
        .get(format!("{}/metrics", api.url))
        .bearer_auth(&api.key)
        .send()
        .await?
        .text()
        .await?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("berth_placement_seconds_sum"),
        value("berth_placement_seconds_count") as u64,
    ))
}

pub async fn run(runs: usize, requests: usize, database_url: String) -> anyhow::Result<()> {
    let lease_ms = 2000;
    let name = format!("bench_cluster_{}", std::process::id());
    let db = berth_store::postgres::ensure_database(&database_url, &name).await?;
    let snap_dir = tempfile::tempdir()?;
    let snapshots = format!("file://{}", snap_dir.path().display());
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(spawn(&format!("bench{i}"), &db, &snapshots, lease_ms).await?);
    }
    let (a1, a2) = (nodes[0].api.clone(), nodes[1].api.clone());

    // A box on node 2, asked of node 1.
    only(&a1, Some("bench2")).await?;
    let spec = json!({"resources": {"cpus": 0.5, "memory_mib": 256, "disk_mib": 128}});
    let b = a1.post("/v1/boxes", spec.clone()).await?;
    anyhow::ensure!(b["node"] == "bench2", "placed on {}", b["node"]);
    let id = b["id"].as_str().unwrap_or_default().to_string();
    only(&a1, None).await?;
    a1.post(
        "/v1/sessions",
        json!({"box": id, "agent": {"kind": "command", "argv": ["/usr/bin/python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"]}}),
    )
    .await?;
    let port = format!("/v1/boxes/{id}/ports/8000/");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_ttfb(&a2, &port).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the box's port never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "| forwarding (box on node 2) | run | n | direct median ms | direct p90 ms | via node 1 median ms | via node 1 p90 ms | added (median) ms |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for run in 1..=runs {
        for (what, direct_via) in [
            ("exec /bin/true", true),
            ("port GET, time to first byte", false),
        ] {
            let (mut direct, mut via) = (Vec::new(), Vec::new());
            // Warm both paths' pooled connections, then alternate.
            for _ in 0..5 {
                if direct_via {
                    timed_exec(&a2, &id).await?;
                    timed_exec(&a1, &id).await?;
                } else {
                    get_ttfb(&a2, &port).await?;
                    get_ttfb(&a1, &port).await?;
                }
            }
            for _ in 0..requests {
                if direct_via {
                    direct.push(timed_exec(&a2, &id).await?);
                    via.push(timed_exec(&a1, &id).await?);
                } else {
                    direct.push(get_ttfb(&a2, &port).await?);
                    via.push(get_ttfb(&a1, &port).await?);
                }
            }
            let (dm, dp) = stats(direct);
            let (vm, vp) = stats(via);
            println!(
                "| {what} | {run} | {requests} | {} | {} | {} | {} | {:.2} |",
                ms(dm),
                ms(dp),
                ms(vm),
                ms(vp),
                (vm.as_secs_f64() - dm.as_secs_f64()) * 1000.0
            );
        }
    }

    // Placement: creates through node 1, placed over the three nodes.
    println!();
    println!("| placement on `POST /v1/boxes` | run | creates | mean µs (node 1's `berth_placement_seconds`) | create median ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for run in 1..=runs {
        let (s0, n0) = placement_mean(&a1).await?;
        let mut creates = Vec::new();
        let mut made = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let b = a1.post("/v1/boxes", spec.clone()).await?;
            creates.push(t.elapsed());
            made.push(b["id"].as_str().unwrap_or_default().to_string());
        }
        let (s1, n1) = placement_mean(&a1).await?;
        let mean_us = (s1 - s0) / (n1.saturating_sub(n0)).max(1) as f64 * 1e6;
        let (cm, _) = stats(creates);
        println!("| | {run} | {} | {mean_us:.1} | {} |", n1 - n0, ms(cm));
        for id in made {
            a1.call(
                reqwest::Method::DELETE,
                &format!("/v1/boxes/{id}"),
                json!(null),
            )
            .await?;
        }
    }

    // Node death: a parked hybrid box on node 3, node 3 killed, until node 1 sees it restorable.
    println!();
    println!("| node `kill -9` → its parked hybrid box restorable elsewhere (lease {lease_ms} ms, renewed every {} ms) | run | ms |", lease_ms / 5);
    println!("| --- | ---: | ---: |");
    for run in 1..=runs {
        only(&a1, Some("bench3")).await?;
        let b = a1
            .post("/v1/boxes", json!({"lifecycle": "hybrid", "resources": {"cpus": 0.5, "memory_mib": 256, "disk_mib": 128}}))
            .await?;
        let hid = b["id"].as_str().unwrap_or_default().to_string();
        only(&a1, None).await?;
        a1.post(&format!("/v1/boxes/{hid}/park"), json!({})).await?;
        let n3 = &mut nodes[2];
        n3.child.start_kill()?;
        let killed = Instant::now();
        n3.child.wait().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let b = a1
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/boxes/{hid}"),
                    json!(null),
                )
                .await?;
            if b["state"] == "parked" && b["node"].is_null() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "never restorable: {b}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("| | {run} | {} |", ms(killed.elapsed()));
        nodes[2] = spawn("bench3", &db, &snapshots, lease_ms).await?;
    }
    println!();
    println!("load average at the end: {:.2}", crate::pools::loadavg());
    for mut n in nodes {
        let _ = n.child.start_kill();
        let _ = n.child.wait().await;
    }
    Ok(())
}
