//! Another tenant's exec latency while one box floods every socket it can reach (the model
//! gateway, the egress proxy and the box-side API bridges), against the same tenant's latency
//! with the server idle, in the same run.
//!
//! The flooding box runs a small Python program that keeps `per_port` connections open to each
//! bridge (more than the per-box cap), each having sent half a request head so the server's
//! header timer runs, and reopens whatever the server closes or refuses. The victim, a box of
//! another tenant, runs `/bin/true` `execs` times back to back before, during and after.

use std::time::{Duration, Instant};

const FLOOD: &str = r#"
import resource, socket, sys, time
dur, per_port = float(sys.argv[1]), int(sys.argv[2])
ports = [47100, 47101, 47102]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks, opened, answered, failed, peak = [], 0, 0, 0, 0
end = time.time() + dur
while time.time() < end:
    alive = []
    for s in socks:
        try:
            if s.recv(1, socket.MSG_PEEK) == b"":
                s.close()
            else:
                answered += 1
                s.close()
        except BlockingIOError:
            alive.append(s)
        except OSError:
            s.close()
    socks = alive
    for i in range(per_port * len(ports) - len(socks)):
        try:
            s = socket.create_connection(("127.0.0.1", ports[i % len(ports)]), timeout=1)
            s.setblocking(False)
            s.send(b"GET /v1/models HTTP/1.1\r\n")
            socks.append(s)
            opened += 1
        except OSError:
            failed += 1
            break
    peak = max(peak, len(socks))
    time.sleep(0.05)
print(opened, answered, failed, peak)
"#;

struct Phase {
    name: &'static str,
    lat: Vec<Duration>,
}

async fn execs(api: &crate::BenchApi, bx: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = api
            .post(
                &format!("/v1/boxes/{bx}/exec"),
                serde_json::json!({"argv": ["/bin/true"]}),
            )
            .await?;
        anyhow::ensure!(r["exit_code"] == 0, "exec: {r}");
        v.push(t.elapsed());
    }
    Ok(v)
}

async fn tenant(admin: &crate::BenchApi, name: &str) -> anyhow::Result<crate::BenchApi> {
    let k = admin
        .post("/v1/keys", serde_json::json!({"tenant": name}))
        .await?;
    let key = k["key"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no key in {k}"))?;
    Ok(crate::BenchApi::new(&admin.url, key))
}

pub async fn run(runs: usize, execs_per_phase: usize, per_port: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let (url, key, stop, server) = crate::start_server(cfg).await?;
    let admin = crate::BenchApi::new(&url, &key);
    let flooder = tenant(&admin, "flooder").await?;
    let victim = tenant(&admin, "victim").await?;
    println!("| run | phase | n | median ms | p99 ms | p99 ÷ idle p99 |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let spec = serde_json::json!({"resources": {"memory_mib": 512, "disk_mib": 256}});
        let fb = flooder.post("/v1/boxes", spec.clone()).await?;
        let fb = fb["id"].as_str().unwrap_or_default().to_string();
        let vb = victim.post("/v1/boxes", spec).await?;
        let vb = vb["id"].as_str().unwrap_or_default().to_string();
        execs(&victim, &vb, 20).await?; // warm-up, untimed
        let before = execs(&victim, &vb, execs_per_phase).await?;
        // The flood lasts long enough to cover the measured phase after a ramp-up.
        let flood_secs = 8 + execs_per_phase / 20;
        let flood = {
            let (flooder, fb) = (flooder.clone(), fb.clone());
            tokio::spawn(async move {
                flooder
                    .post(
                        &format!("/v1/boxes/{fb}/exec"),
                        serde_json::json!({
                            "argv": ["python3", "-c", FLOOD, flood_secs.to_string(), per_port.to_string()],
                            "timeout_s": flood_secs + 30,
                        }),
                    )
                    .await
            })
        };
        // A bench, not a test: the flood gets a fixed ramp-up before the measured phase.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = execs(&victim, &vb, execs_per_phase).await?;
        let flood = flood.await??;
        let after = execs(&victim, &vb, execs_per_phase).await?;
        let phases = [
            Phase {
                name: "idle, before",
                lat: before,
            },
            Phase {
                name: "during the flood",
                lat: during,
            },
            Phase {
                name: "idle, after",
                lat: after,
            },
        ];
        let sums: Vec<_> = phases
            .into_iter()
            .map(|p| crate::summarize(p.name, p.lat))
            .collect();
        let idle_p99 = sums[0].p99.max(sums[2].p99);
        for s in &sums {
            println!(
                "| {run} | {} | {} | {} | {} | {:.2} |",
                s.name,
                s.n,
                crate::ms(s.median),
                crate::ms(s.p99),
                s.p99.as_secs_f64() / idle_p99.as_secs_f64()
            );
        }
        ratios.push(sums[1].p99.as_secs_f64() / idle_p99.as_secs_f64());
        let out = flood["stdout"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string();
        let f: Vec<&str> = out.split_whitespace().collect();
        println!(
            "| {run} | flood: opened {}, answered/refused {}, connect failures {}, most open at once {} | | | | |",
            f.first().unwrap_or(&"?"),
            f.get(1).unwrap_or(&"?"),
            f.get(2).unwrap_or(&"?"),
            f.get(3).unwrap_or(&"?"),
        );
        for b in [(&flooder, &fb), (&victim, &vb)] {
            b.0.call(
                reqwest::Method::DELETE,
                &format!("/v1/boxes/{}", b.1),
                serde_json::Value::Null,
            )
            .await?;
        }
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nduring-flood p99 ÷ idle p99 over {runs} runs: min {:.2}, max {:.2} (goal ≤ 2)",
        ratios.first().copied().unwrap_or(f64::NAN),
        ratios.last().copied().unwrap_or(f64::NAN)
    );
    let _ = stop.send(());
    let _ = server.await;
    Ok(())
}
