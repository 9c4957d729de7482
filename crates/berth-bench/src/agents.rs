//! Agent start-up and concurrency with the real Claude Code CLI against the mock model.
//!
//! Start-up: rounds interleave the CLI started by hand (same flags) with `POST /v1/sessions`
//! into an existing box at the default `cpus: 1.0` and into one at `cpus: 2.0` (the host's
//! cores), so all three see the same host load; `--spinners N` keeps N boxes spinning on CPU
//! meanwhile (a busy host). For berth the path is split at the moment the CLI's process
//! appears in the box's cgroup (polled every millisecond): berth's own part before it, and
//! the CLI's start inside the box after it.

use crate::{ms, summarize, wait_requests, BenchApi};
use berth_mock_model::{scenario::Scenario, unix_ms, Mock};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub struct Opts {
    pub runs: usize,
    pub concurrent: usize,
    pub server_config: Option<std::path::PathBuf>,
    pub max_boxes_per_tenant: Option<usize>,
    pub spinners: usize,
    /// Hybrid boxes whose idle sessions are parked to show memory given back (0: skipped).
    pub parked: usize,
}

/// The used memory of the host (MemTotal − MemAvailable), KiB.
fn host_used_kb() -> i64 {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| -> i64 {
        m.lines()
            .find_map(|l| {
                l.strip_prefix(k)?
                    .trim_start_matches(':')
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    get("MemTotal") - get("MemAvailable")
}

fn own_rss_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Unix ms at which a process not in `before` first shows in box `id`'s cgroup (polled every
/// millisecond, for at most 30 s).
async fn first_new_process(id: String, before: HashSet<u64>) -> Option<f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let cg = berth_sandbox::native::cgroup::BoxCgroup::load(&id);
        if cg.procs().iter().any(|p| !before.contains(p)) {
            return Some(unix_ms());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

fn box_procs(id: &str) -> HashSet<u64> {
    berth_sandbox::native::cgroup::BoxCgroup::load(id)
        .procs()
        .into_iter()
        .collect()
}

/// A busy host: `n` boxes spinning on CPU (each at the default 1 cpu), added to `made`.
pub(crate) async fn spinners(
    api: &BenchApi,
    n: usize,
    made: &mut Vec<String>,
) -> anyhow::Result<()> {
    for _ in 0..n {
        let b = api
            .post("/v1/boxes", json!({"idle_timeout_s": null}))
            .await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        made.push(b.clone());
        let r = api
            .post(
                &format!("/v1/boxes/{b}/exec"),
                json!({"argv": ["sh", "-c", "setsid sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &"]}),
            )
            .await?;
        anyhow::ensure!(r["exit_code"] == 0, "spinner did not start: {r}");
    }
    Ok(())
}

/// One session start into box `bx`: (POST → first model request, POST → CLI process in the
/// box, CLI process → first model request).
async fn berth_start(
    api: &BenchApi,
    mock: &Mock,
    bx: &str,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    let before = mock.recorded().len();
    let watch = tokio::spawn(first_new_process(bx.to_string(), box_procs(bx)));
    let t0 = unix_ms();
    let s = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": {"kind": "claude"}, "prompt": "be slow"}),
        )
        .await?;
    let at = wait_requests(mock, before + 1).await?;
    let spawned = watch.await?.unwrap_or(at);
    let sid = s["id"].as_str().unwrap_or_default();
    api.call(
        reqwest::Method::DELETE,
        &format!("/v1/sessions/{sid}"),
        json!(null),
    )
    .await?;
    // The session's processes are gone before the next round watches for a new one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while box_procs(bx).len() > 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((
        crate::between_unix_ms(t0, at),
        crate::between_unix_ms(t0, spawned),
        crate::between_unix_ms(spawned, at),
    ))
}

/// The CLI started by hand with a box's flags: spawn → first model request.
async fn by_hand(
    cli: &str,
    mock: &Mock,
    mock_url: &str,
    cfg: &std::path::Path,
) -> anyhow::Result<Duration> {
    let before = mock.recorded().len();
    let scratch = cfg.parent().unwrap_or(cfg);
    let t0 = unix_ms();
    // As root the CLI refuses bypassPermissions, so acceptEdits; the mode does not change
    // start-up.
    let mut child = tokio::process::Command::new(cli)
        .args([
            "-p",
            "--output-format=stream-json",
            "--input-format=stream-json",
            "--verbose",
            "--permission-mode=acceptEdits",
        ])
        .current_dir(scratch)
        .env("ANTHROPIC_BASE_URL", mock_url)
        .env("ANTHROPIC_API_KEY", "sk-bench")
        .env("CLAUDE_CONFIG_DIR", cfg)
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
    stdin
        .write_all(
            format!(
                "{}\n",
                json!({"type": "user", "message": {"role": "user", "content": "be slow"}})
            )
            .as_bytes(),
        )
        .await?;
    let at = wait_requests(mock, before + 1).await?;
    let _ = child.kill().await;
    Ok(crate::between_unix_ms(t0, at))
}

fn spread(v: &[Duration]) -> String {
    let min = v.iter().min().copied().unwrap_or_default();
    let max = v.iter().max().copied().unwrap_or_default();
    format!("{}–{}", ms(min), ms(max))
}

pub async fn run(o: Opts) -> anyhow::Result<()> {
    let cli = std::env::var("BERTH_CLAUDE_BIN")
        .unwrap_or_else(|_| "/opt/berth/claude-code-2.1.328/node_modules/.bin/claude".into());
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await?;

    let dir = tempfile::tempdir()?;
    let mut cfg = crate::density::server_config(o.server_config.as_deref(), dir.path(), &mock_url)?;
    cfg.claude_cli = Some(cli.clone().into());
    cfg.max_boxes_per_tenant = o
        .max_boxes_per_tenant
        .unwrap_or(o.concurrent + o.spinners + o.parked + 10);
    let (url, key, stop_tx, server) = crate::start_server(cfg).await?;
    let api = BenchApi::new(&url, &key);
    let mut made: Vec<String> = Vec::new();
    let result = measure(&o, &cli, &mock, &mock_url, &api, &mut made).await;
    // Every box of the run goes, whatever happened.
    for id in &made {
        if let Err(e) = api
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/boxes/{id}"),
                json!(null),
            )
            .await
        {
            eprintln!("destroy {id}: {e}");
        }
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    result
}

async fn measure(
    o: &Opts,
    cli: &str,
    mock: &Mock,
    mock_url: &str,
    api: &BenchApi,
    made: &mut Vec<String>,
) -> anyhow::Result<()> {
    let id = |v: &Value| v["id"].as_str().unwrap_or_default().to_string();
    spinners(api, o.spinners, made).await?;
    // The boxes sessions start in: the default (cpus 1.0, with the backend's CPU burst), the
    // same without burst, and the host's two cores.
    let mut variants: Vec<(&str, String)> = Vec::new();
    for (name, spec) in [
        (
            "box cpus 1.0 (default)",
            json!({"resources": {"memory_mib": 2048}}),
        ),
        (
            "box cpus 1.0, no CPU burst",
            json!({"resources": {"memory_mib": 2048}}),
        ),
        (
            "box cpus 2.0",
            json!({"resources": {"memory_mib": 2048, "cpus": 2.0}}),
        ),
    ] {
        let b = id(&api.post("/v1/boxes", spec).await?);
        made.push(b.clone());
        if name.contains("no CPU burst") {
            // NotFound: this kernel has no burst, and the row is the default's twin.
            let _ = berth_sandbox::native::cgroup::BoxCgroup::load(&b).set_cpu_burst(0);
        }
        variants.push((name, b));
    }

    let load0 = crate::pools::loadavg();
    let scratch = tempfile::tempdir()?;
    let mut hand = Vec::new();
    // Per variant: total, POST → CLI process, CLI process → first request.
    let mut series: Vec<[Vec<Duration>; 3]> = variants.iter().map(|_| Default::default()).collect();
    for i in 0..o.runs {
        hand.push(by_hand(cli, mock, mock_url, &scratch.path().join(format!("cfg{i}"))).await?);
        for (v, (_, b)) in variants.iter().enumerate() {
            let (t, pre, c) = berth_start(api, mock, b).await?;
            series[v][0].push(t);
            series[v][1].push(pre);
            series[v][2].push(c);
        }
    }
    let load1 = crate::pools::loadavg();
    println!(
        "host load (1-min loadavg, 2 cores) before {load0:.2}, after {load1:.2}; {} boxes spinning",
        o.spinners
    );
    println!();
    println!("| agent start → first request at the mock | n | median ms | p99 ms | min–max ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let row = |name: &str, v: &[Duration]| {
        let s = summarize(name, v.to_vec());
        println!(
            "| {name} | {} | {} | {} | {} |",
            s.n,
            ms(s.median),
            ms(s.p99),
            spread(v)
        );
        s.median
    };
    let by_hand_median = row("CLI started by hand (same flags)", &hand);
    let mut added = Vec::new();
    for ((name, _), s) in variants.iter().zip(&series) {
        let m = row(&format!("POST /v1/sessions, {name}"), &s[0]);
        row("… of which POST → CLI process in the box", &s[1]);
        row("… of which CLI process → first request", &s[2]);
        added.push(format!(
            "{name}: {:+.2}",
            (m.as_secs_f64() - by_hand_median.as_secs_f64()) * 1000.0
        ));
    }
    println!("| added by berth (medians) | | {} | | |", added.join("; "));
    if o.parked > 0 {
        parking(o.parked, api, mock, made).await?;
    }
    if o.concurrent == 0 {
        return Ok(());
    }

    // Concurrency: N sessions, each in its own box, each a two-tool-call task.
    let used0 = host_used_kb();
    let rss0 = own_rss_kb();
    let t = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..o.concurrent {
        let s = api.post("/v1/sessions", json!({"box": {"lifecycle": "persistent", "resources": {"memory_mib": 1024, "disk_mib": 256}}, "agent": {"kind": "claude"}, "prompt": "make a file"})).await?;
        let sid = s["id"].as_str().unwrap_or_default().to_string();
        let box_id = s["box_id"].as_str().unwrap_or_default().to_string();
        made.push(box_id.clone());
        let api = api.clone();
        set.spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            loop {
                let s = api
                    .call(
                        reqwest::Method::GET,
                        &format!("/v1/sessions/{sid}"),
                        json!(null),
                    )
                    .await?;
                if s["state"] == "idle" && s["last_seq"].as_i64().unwrap_or(0) > 3 {
                    let took = t.elapsed();
                    let ok = s["state_reason"].is_null();
                    let st = api
                        .call(
                            reqwest::Method::GET,
                            &format!("/v1/boxes/{box_id}/stats"),
                            json!(null),
                        )
                        .await?;
                    let f = api
                        .http
                        .get(format!("{}/v1/boxes/{box_id}/files/hello.txt", api.url))
                        .bearer_auth(&api.key)
                        .send()
                        .await?;
                    return Ok::<(bool, u64, Duration), anyhow::Error>((
                        ok && f.status().is_success(),
                        st["memory_bytes"].as_u64().unwrap_or(0),
                        took,
                    ));
                }
                if s["state"] == "failed" || std::time::Instant::now() > deadline {
                    return Ok((false, 0, t.elapsed()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let mut ok = 0;
    let mut mem = Vec::new();
    let mut done = Vec::new();
    while let Some(r) = set.join_next().await {
        let (good, m, took) = r??;
        ok += usize::from(good);
        mem.push(m);
        done.push(took);
    }
    let wall = t.elapsed();
    // Every session idle (its CLI waiting for a next message), every box alive.
    let used1 = host_used_kb();
    let rss1 = own_rss_kb();
    mem.sort();
    done.sort();
    let n = o.concurrent;
    println!();
    println!("| {n} concurrent sessions, each Write + Bash + answer, own box | value |");
    println!("| --- | ---: |");
    println!("| completed without error | {ok} / {n} |");
    println!("| wall time for all | {:.1} s |", wall.as_secs_f64());
    println!(
        "| time to a session's end, median / max | {:.1} / {:.1} s |",
        done[done.len() / 2].as_secs_f64(),
        done.last().copied().unwrap_or_default().as_secs_f64()
    );
    println!(
        "| host memory per session, idle after its task (used, MemTotal − MemAvailable) | {:.1} MiB |",
        (used1 - used0) as f64 / 1024.0 / n as f64
    );
    println!(
        "| server RSS per session | {:.1} KiB |",
        (rss1 - rss0) as f64 / n as f64
    );
    println!(
        "| box memory per session after its task (median, cgroup) | {:.0} MiB |",
        mem[mem.len() / 2] as f64 / 1048576.0
    );
    println!(
        "| box memory per session (max) | {:.0} MiB |",
        mem.last().copied().unwrap_or(0) as f64 / 1048576.0
    );
    Ok(())
}

/// Wait until session `sid` is idle (its turn over), at most a minute.
async fn idle(api: &BenchApi, sid: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/sessions/{sid}"),
                json!(null),
            )
            .await?;
        if s["state"] == "idle" && s["last_seq"].as_i64().unwrap_or(0) > 3 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "session {sid} never went idle: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Hybrid parking as the way past RAM: `n` sessions, each in a hybrid box of its own, idle
/// after a task with their CLI resident; the host's memory with all of them, after parking
/// them all, and a parked session's next message (restore + resumed CLI → first request).
async fn parking(
    n: usize,
    api: &BenchApi,
    mock: &Mock,
    made: &mut Vec<String>,
) -> anyhow::Result<()> {
    let used0 = host_used_kb();
    let mut sessions = Vec::new();
    for _ in 0..n {
        let s = api
            .post(
                "/v1/sessions",
                json!({"box": {"lifecycle": "hybrid", "idle_timeout_s": 3600,
                               "resources": {"memory_mib": 1024, "disk_mib": 256}},
                       "agent": {"kind": "claude"}, "prompt": "make a file"}),
            )
            .await?;
        let sid = s["id"].as_str().unwrap_or_default().to_string();
        let bx = s["box_id"].as_str().unwrap_or_default().to_string();
        made.push(bx.clone());
        sessions.push((sid, bx));
    }
    for (sid, _) in &sessions {
        idle(api, sid).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used_idle = host_used_kb();
    // What the boxes hold (their cgroups: the CLI and everything else in them), noise-free.
    let mut charged = 0u64;
    for (_, bx) in &sessions {
        let st = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/boxes/{bx}/stats"),
                json!(null),
            )
            .await?;
        charged += st["memory_bytes"].as_u64().unwrap_or(0);
    }
    let mut parked_states = 0usize;
    let t = std::time::Instant::now();
    for (_, bx) in &sessions {
        api.post(&format!("/v1/boxes/{bx}/park"), json!({})).await?;
    }
    let parked_in = t.elapsed();
    for (_, bx) in &sessions {
        let b = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/boxes/{bx}"),
                json!(null),
            )
            .await?;
        parked_states += usize::from(b["state"] == "parked");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used_parked = host_used_kb();
    let mut back = Vec::new();
    for (sid, _) in sessions.iter().take(3) {
        let (took, _) = api
            .post_until_model_request(
                mock,
                &format!("/v1/sessions/{sid}/messages"),
                json!({"content": "be quick"}),
            )
            .await?;
        back.push(took);
    }
    let per = |kb: i64| kb as f64 / 1024.0 / n as f64;
    println!();
    println!("| hybrid parking, {n} idle Claude sessions in hybrid boxes | value |");
    println!("| --- | ---: |");
    println!(
        "| host memory per idle session, CLI resident (used) | {:.1} MiB |",
        per(used_idle - used0)
    );
    println!(
        "| host memory per session once parked (used) | {:.1} MiB |",
        per(used_parked - used0)
    );
    println!(
        "| box memory per idle session (its cgroup, before parking) | {:.1} MiB |",
        charged as f64 / 1048576.0 / n as f64
    );
    println!("| boxes parked (no process, no cgroup left) | {parked_states} of {n} |");
    println!(
        "| park, per box (sequential) | {:.0} ms |",
        parked_in.as_secs_f64() * 1000.0 / n as f64
    );
    let s = summarize("", back.clone());
    println!(
        "| message to a parked session → first model request (restore + resumed CLI), median of {} | {} ms ({}) |",
        back.len(),
        ms(s.median),
        spread(&back)
    );
    Ok(())
}
