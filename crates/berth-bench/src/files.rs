//! Server memory while files stream: the server's resident memory when idle, and its peak
//! while `clients` clients GET one large file in parallel. The server runs in a child process
//! of its own (this binary, `files-server`), so the clients' buffers are not counted.

use std::io::BufRead;
use std::time::{Duration, Instant};

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The `files-server` child: a berth server on loopback; prints `<url> <admin key>` once up.
pub async fn serve(data_dir: std::path::PathBuf) -> anyhow::Result<()> {
    let cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir,
        ..Default::default()
    };
    let (url, key, _stop, server) = crate::start_server(cfg).await?;
    println!("{url} {key}");
    server.await?;
    Ok(())
}

struct Run {
    idle_mib: f64,
    peak_mib: f64,
    secs: f64,
}

pub async fn run(runs: usize, clients: usize, mib: u64) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for _ in 0..runs {
        results.push(one(clients, mib).await?);
    }
    println!("| run | idle RSS MiB | peak RSS MiB | growth MiB | aggregate MB/s |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for (i, r) in results.iter().enumerate() {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.0} |",
            i + 1,
            r.idle_mib,
            r.peak_mib,
            r.peak_mib - r.idle_mib,
            (clients as u64 * mib) as f64 * 1.048576 / r.secs
        );
    }
    Ok(())
}

async fn one(clients: usize, mib: u64) -> anyhow::Result<Run> {
    use futures::StreamExt;
    let dir = tempfile::tempdir()?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["files-server", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let line = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        std::io::BufReader::new(stdout).read_line(&mut l).map(|_| l)
    })
    .await??;
    let mut parts = line.split_whitespace();
    let (url, key) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    );
    let result = async {
        let api = crate::BenchApi::new(&url, &key);
        let bx = api
            .post(
                "/v1/boxes",
                serde_json::json!({"resources": {"memory_mib": 512, "disk_mib": mib * 2 + 256}}),
            )
            .await?;
        let bx = bx["id"].as_str().unwrap_or_default().to_string();
        api.post(
            &format!("/v1/boxes/{bx}/exec"),
            serde_json::json!({"argv": ["sh", "-c",
                format!("head -c {} /dev/urandom > /workspace/big", mib << 20)]}),
        )
        .await?;
        // Idle: after a settle, the lowest of a few samples.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut idle = u64::MAX;
        for _ in 0..10 {
            idle = idle.min(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut peak = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    peak = peak.max(rss_kib(pid));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                peak.max(rss_kib(pid))
            })
        };
        let t = Instant::now();
        let gets = (0..clients).map(|_| {
            let (api, bx) = (api.clone(), bx.clone());
            async move {
                let r = api
                    .http
                    .get(format!("{}/v1/boxes/{bx}/files/big", api.url))
                    .bearer_auth(&api.key)
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "GET: {}", r.status());
                let mut n = 0u64;
                let mut s = r.bytes_stream();
                while let Some(c) = s.next().await {
                    n += c?.len() as u64;
                }
                anyhow::ensure!(n == mib << 20, "got {n} bytes");
                Ok(())
            }
        });
        for r in futures::future::join_all(gets).await {
            r?;
        }
        let secs = t.elapsed().as_secs_f64();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let peak = sampler.await?;
        Ok::<_, anyhow::Error>(Run {
            idle_mib: idle as f64 / 1024.0,
            peak_mib: peak as f64 / 1024.0,
            secs,
        })
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}
