//! Density: how many idle persistent native boxes one host holds, what each costs, and what
//! stops the count.
//!
//! One server (its config from a berth TOML file and the environment, like `berth serve`;
//! `--max-boxes-per-tenant` defaults to room for the run) makes `--boxes` boxes one after
//! another, each `POST /v1/boxes` timed; then every box gets its workload, a process started so
//! that it outlives its exec (`setsid sleep infinity &`). Host memory is read before the
//! boxes, after them, and after their workloads, and split: the server's RSS, each box's own
//! processes (helper, PID 1, supervisor; PSS), the workload's, and the kernel (meminfo
//! categories, slab caches). The run stops at the first failure (the error names the limit it
//! hit), at `--max-seconds`, or at the count; then every box is destroyed and the bench checks
//! that no box directory, cgroup, loop device or mount namespace of the run is left.

use crate::BenchApi;
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The workload: `sleep` in a session of its own, so that the kill of the exec's process group
/// at the exec's end spares it; the exec ends only once it has left the group (its session id
/// is its pid), else that kill could come first.
const WORKLOAD: &str = "setsid sh -c 'exec sleep infinity' </dev/null >/dev/null 2>&1 & \
    p=$!; while [ \"$(cut -d' ' -f6 /proc/$p/stat)\" != \"$p\" ]; do :; done";

pub struct Opts {
    pub boxes: usize,
    pub parallel: usize,
    pub disk_mib: u64,
    pub memory_mib: u64,
    pub max_seconds: u64,
    /// A berth config file for the server (else defaults and `BERTH_*`).
    pub config: Option<PathBuf>,
    pub max_boxes_per_tenant: Option<usize>,
    /// Start the workload in each box (off: boxes only).
    pub workload: bool,
}

/// The bench's own server config: `file` (and the environment) as `berth serve` reads them,
/// then what a bench run must own (listen address, data directory, model upstream).
pub fn server_config(
    file: Option<&Path>,
    data_dir: &Path,
    upstream: &str,
) -> anyhow::Result<berth_server::Config> {
    let mut cfg = berth_server::Config::load(file)?;
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.data_dir = data_dir.to_path_buf();
    cfg.upstream_url = upstream.to_string();
    cfg.anthropic_api_key = Some("sk-bench".into());
    cfg.database_url = None;
    cfg.snapshot_url = None;
    cfg.snapshot_dir = None;
    Ok(cfg)
}

/// `/proc/meminfo` in KiB.
fn meminfo() -> BTreeMap<String, i64> {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_string(), v.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// Bytes held by each slab cache (`num_objs × objsize`).
fn slabinfo() -> HashMap<String, i64> {
    std::fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n: i64 = f.get(2)?.parse().ok()?;
            let size: i64 = f.get(3)?.parse().ok()?;
            Some((f.first()?.to_string(), n * size))
        })
        .collect()
}

fn status_kb(pid: &str, key: &str) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn pss_kb(pid: u64) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Pss:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Whether `pid` is PID 1 of its own PID namespace.
fn nspid_is_one(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last().map(|s| s == "1"))
        .unwrap_or(false)
}

/// (ppid, comm) of a process.
fn stat(pid: u64) -> Option<(u64, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let ppid = s[close + 2..].split_whitespace().nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// Tasks (threads) on the host: `/proc/loadavg`'s fourth field's denominator.
fn host_tasks() -> i64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok())
        .unwrap_or(0)
}

fn read_num(path: &str) -> i64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1)
}

/// Loop devices the kernel has (bound or not).
fn loop_devices() -> usize {
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
                .count()
        })
        .unwrap_or(0)
}

/// Loop devices whose backing file lies under `dir`.
fn loops_under(dir: &Path) -> usize {
    let want = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/sys/block")
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("loop/backing_file"))
                        .is_ok_and(|b| b.starts_with(&want))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Open descriptors of this process (the server runs in it).
fn own_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Per-role PSS (KiB) and task counts of the boxes' own processes, read from their cgroups.
#[derive(Default, Debug)]
struct BoxProcs {
    helper: i64,
    init: i64,
    supervisor: i64,
    workload: i64,
    /// Threads of the supervisors (summed).
    supervisor_threads: i64,
    /// Threads of the boxes' PID 1s (summed).
    init_threads: i64,
    processes: usize,
    /// Boxes whose cgroup listed no process (the box's cgroup path was not found).
    unseen: usize,
    /// Boxes whose workload is alive.
    with_workload: usize,
    /// Memory charged to the boxes' memory cgroups (KiB, summed).
    charged: i64,
}

fn box_procs(ids: &[String]) -> BoxProcs {
    let mut out = BoxProcs::default();
    for id in ids {
        let cg = berth_sandbox::native::cgroup::BoxCgroup::load(id);
        let pids: HashSet<u64> = cg.procs().into_iter().collect();
        if pids.is_empty() {
            out.unseen += 1;
            continue;
        }
        out.charged += (cg.counters().memory_bytes / 1024) as i64;
        let info: HashMap<u64, (u64, String)> =
            pids.iter().filter_map(|p| Some((*p, stat(*p)?))).collect();
        // C is the box's PID 1 (its NSpid ends in 1) and, since session 12, its supervisor
        // too; H, where one waits beside the box (before session 9), is C's parent; a
        // supervisor of its own (before session 12) is C's child.
        let init = info.keys().copied().find(|p| nspid_is_one(*p));
        let helper = init
            .and_then(|c| info.get(&c).map(|(pp, _)| *pp))
            .filter(|h| pids.contains(h));
        let mut seen_workload = false;
        for (pid, (ppid, comm)) in &info {
            let pss = pss_kb(*pid);
            out.processes += 1;
            if Some(*pid) == helper {
                out.helper += pss;
            } else if Some(*pid) == init {
                out.init += pss;
                out.init_threads += status_kb(&pid.to_string(), "Threads");
            } else if Some(*ppid) == init && comm != "sleep" {
                out.supervisor += pss;
                out.supervisor_threads += status_kb(&pid.to_string(), "Threads");
            } else {
                out.workload += pss;
                seen_workload |= comm == "sleep";
            }
        }
        out.with_workload += usize::from(seen_workload);
    }
    out
}

struct Snapshot {
    mem: BTreeMap<String, i64>,
    slab: HashMap<String, i64>,
    server_rss: i64,
    tasks: i64,
    fds: usize,
}

fn snapshot() -> Snapshot {
    Snapshot {
        mem: meminfo(),
        slab: slabinfo(),
        server_rss: status_kb("self", "VmRSS"),
        tasks: host_tasks(),
        fds: own_fds(),
    }
}

/// Let the kernel's deferred frees and the disk pool's refill finish before reading memory.
async fn settle_host() {
    tokio::time::sleep(Duration::from_secs(5)).await;
}

const MEM_KEYS: [&str; 12] = [
    "AnonPages",
    "PageTables",
    "KernelStack",
    "Slab",
    "SUnreclaim",
    "SReclaimable",
    "Percpu",
    "Shmem",
    "Buffers",
    "Cached",
    "Mapped",
    "VmallocUsed",
];

fn used_kb(m: &BTreeMap<String, i64>) -> i64 {
    m.get("MemTotal").copied().unwrap_or(0) - m.get("MemAvailable").copied().unwrap_or(0)
}

fn per_box_kib(delta_kb: i64, n: usize) -> String {
    if n == 0 {
        return "-".into();
    }
    format!("{:.1}", delta_kb as f64 / n as f64)
}

fn print_split(what: &str, a: &Snapshot, b: &Snapshot, n: usize, procs: &BoxProcs) {
    println!();
    println!("| {what}: host memory per box ({n} boxes) | KiB per box |");
    println!("| --- | ---: |");
    let used = used_kb(&b.mem) - used_kb(&a.mem);
    println!(
        "| **used** (MemTotal − MemAvailable) | **{}** |",
        per_box_kib(used, n)
    );
    let free =
        a.mem.get("MemFree").copied().unwrap_or(0) - b.mem.get("MemFree").copied().unwrap_or(0);
    println!("| MemFree drop | {} |", per_box_kib(free, n));
    println!(
        "| server RSS (this process) | {} |",
        per_box_kib(b.server_rss - a.server_rss, n)
    );
    println!("| box helper (H) PSS | {} |", per_box_kib(procs.helper, n));
    println!(
        "| box PID 1 (C, the supervisor; {:.1} threads each) PSS | {} |",
        procs.init_threads as f64 / n.max(1) as f64,
        per_box_kib(procs.init, n)
    );
    println!(
        "| a separate supervisor's PSS ({:.1} threads each) | {} |",
        procs.supervisor_threads as f64 / n.max(1) as f64,
        per_box_kib(procs.supervisor, n)
    );
    println!("| workload PSS | {} |", per_box_kib(procs.workload, n));
    println!(
        "| charged to the box's memory cgroup | {} |",
        per_box_kib(procs.charged, n)
    );
    for k in MEM_KEYS {
        let d = b.mem.get(k).copied().unwrap_or(0) - a.mem.get(k).copied().unwrap_or(0);
        println!("| meminfo {k} | {} |", per_box_kib(d, n));
    }
    println!(
        "| host tasks (threads, kernel threads included) | {:.2} per box |",
        (b.tasks - a.tasks) as f64 / n.max(1) as f64
    );
    println!(
        "| server descriptors | {:.2} per box |",
        (b.fds as f64 - a.fds as f64) / n.max(1) as f64
    );
    let mut slab: Vec<(String, i64)> = b
        .slab
        .iter()
        .map(|(k, v)| (k.clone(), v - a.slab.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect();
    slab.sort_by_key(|(_, d)| -d);
    let top: Vec<String> = slab
        .iter()
        .take(12)
        .map(|(k, d)| format!("{k} {:.1}", *d as f64 / 1024.0 / n.max(1) as f64))
        .collect();
    println!(
        "| slab caches, largest growth (KiB per box) | {} |",
        top.join(", ")
    );
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Medians of create time around box `at` (1-based), over `at±5`.
fn around(times: &[Duration], at: usize) -> Option<Duration> {
    if times.len() < at {
        return None;
    }
    let lo = at.saturating_sub(6);
    let hi = (at + 5).min(times.len());
    let mut w = times[lo..hi].to_vec();
    Some(median(&mut w))
}

/// Create times of one tenth of a run (boxes `from`..=`to`, counted from 1).
struct Tenth {
    from: usize,
    to: usize,
    median: Duration,
    p90: Duration,
    max: Duration,
}

fn tenths(times: &[Duration]) -> Vec<Tenth> {
    let n = times.len();
    if n < 10 {
        return Vec::new();
    }
    (0..10)
        .map(|i| {
            let (lo, hi) = (i * n / 10, (i + 1) * n / 10);
            let mut w = times[lo..hi].to_vec();
            w.sort();
            Tenth {
                from: lo + 1,
                to: hi,
                median: crate::percentile(&w, 0.5),
                p90: crate::percentile(&w, 0.9),
                max: w.last().copied().unwrap_or_default(),
            }
        })
        .collect()
}

pub async fn run(o: Opts) -> anyhow::Result<()> {
    // The server holds a few descriptors per box: take the hard limit.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on this process with a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let loops_before = loop_devices();
    println!(
        "host limits: pid_max {}, threads-max {}, open files (this process) {}, user.max_net_namespaces {}, \
         fs.mount-max {}, loop devices present {loops_before}",
        read_num("/proc/sys/kernel/pid_max"),
        read_num("/proc/sys/kernel/threads-max"),
        lim.rlim_cur,
        read_num("/proc/sys/user/max_net_namespaces"),
        read_num("/proc/sys/fs/mount-max"),
    );
    let load0 = crate::pools::loadavg();
    let dir = tempfile::tempdir()?;
    let mut cfg = server_config(o.config.as_deref(), dir.path(), "http://127.0.0.1:9")?;
    cfg.max_boxes_per_tenant = o.max_boxes_per_tenant.unwrap_or(o.boxes + 10);
    let before_server = snapshot();
    let (url, key, stop_tx, server) = crate::start_server(cfg).await?;
    let api = BenchApi::new(&url, &key);
    // A first box starts the zygote and the disk pool; it is not counted.
    let warm = api
        .post(
            "/v1/boxes",
            json!({"idle_timeout_s": null, "resources": {"disk_mib": o.disk_mib, "memory_mib": o.memory_mib}}),
        )
        .await?;
    let warm_id = warm["id"].as_str().unwrap_or_default().to_string();
    settle_host().await;
    let s0 = snapshot();
    println!(
        "server idle: RSS {} KiB (before the server {} KiB)",
        s0.server_rss, before_server.server_rss
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(o.max_seconds);
    let mut ids: Vec<String> = Vec::new();
    let mut times: Vec<Duration> = Vec::new();
    let mut stopped: Option<String> = None;
    let spec = json!({"lifecycle": "persistent", "idle_timeout_s": null,
        "resources": {"disk_mib": o.disk_mib, "memory_mib": o.memory_mib}});
    'outer: while ids.len() < o.boxes {
        if Instant::now() > deadline {
            stopped = Some(format!("--max-seconds {} reached", o.max_seconds));
            break;
        }
        let batch = o.parallel.max(1).min(o.boxes - ids.len());
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (api, spec) = (api.clone(), spec.clone());
            set.spawn(async move {
                let t = Instant::now();
                let r = api.post("/v1/boxes", spec).await;
                (t.elapsed(), r)
            });
        }
        while let Some(r) = set.join_next().await {
            let (took, r) = r?;
            match r {
                Ok(b) => {
                    ids.push(b["id"].as_str().unwrap_or_default().to_string());
                    times.push(took);
                }
                Err(e) => {
                    stopped = Some(format!("box {} failed: {e}", ids.len() + 1));
                    // Let the rest of the batch finish, then stop.
                    while let Some(r) = set.join_next().await {
                        if let Ok((took, Ok(b))) = r {
                            ids.push(b["id"].as_str().unwrap_or_default().to_string());
                            times.push(took);
                        }
                    }
                    break 'outer;
                }
            }
        }
        if ids.len().is_multiple_of(500) {
            eprintln!(
                "{} boxes, {:.1} s, last create {:.1} ms, load {:.2}",
                ids.len(),
                started.elapsed().as_secs_f64(),
                times.last().map_or(0.0, |t| t.as_secs_f64() * 1000.0),
                crate::pools::loadavg()
            );
        }
    }
    let made_in = started.elapsed();
    let n = ids.len();
    settle_host().await;
    let s1 = snapshot();
    let procs1 = box_procs(&ids);
    let mounts_per_box = ids
        .first()
        .and_then(|id| {
            let pid = berth_sandbox::native::cgroup::BoxCgroup::load(id)
                .procs()
                .into_iter()
                .max()?;
            Some(
                std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                    .ok()?
                    .lines()
                    .count(),
            )
        })
        .unwrap_or(0);

    // Each box's workload: a process of its own that outlives the exec that started it.
    let mut workload_failed = 0usize;
    let mut s2 = None;
    let mut procs2 = None;
    if o.workload && stopped.is_none() {
        let t = Instant::now();
        for chunk in ids.chunks(o.parallel.max(1)) {
            let mut set = tokio::task::JoinSet::new();
            for id in chunk {
                let (api, id) = (api.clone(), id.clone());
                set.spawn(async move {
                    api.post(
                        &format!("/v1/boxes/{id}/exec"),
                        json!({"argv": ["sh", "-c", WORKLOAD]}),
                    )
                    .await
                });
            }
            while let Some(r) = set.join_next().await {
                if !matches!(r, Ok(Ok(ref v)) if v["exit_code"] == 0) {
                    workload_failed += 1;
                }
            }
            if Instant::now() > deadline {
                stopped = Some(format!(
                    "--max-seconds {} reached while starting workloads",
                    o.max_seconds
                ));
                break;
            }
        }
        eprintln!("workloads started in {:.1} s", t.elapsed().as_secs_f64());
        settle_host().await;
        s2 = Some(snapshot());
        procs2 = Some(box_procs(&ids));
    }
    let load1 = crate::pools::loadavg();

    // Results.
    println!(
        "host load (1-min loadavg, 2 cores) before {load0:.2}, after {load1:.2}; {n} boxes made in {:.1} s{}",
        made_in.as_secs_f64(),
        stopped.as_deref().map(|s| format!("; stopped: {s}")).unwrap_or_default()
    );
    println!();
    println!("| create time (`POST /v1/boxes`), median of 11 around box k | ms |");
    println!("| --- | ---: |");
    let mut ks = vec![10, 100, 1000, 2000, 3000, 4000];
    ks.retain(|k| *k < n);
    ks.push(n);
    for k in ks {
        if let Some(d) = around(&times, k) {
            println!("| k = {k} | {} |", crate::ms(d));
        }
    }
    let mut all = times.clone();
    all.sort();
    println!(
        "| all {n}: median / p99 / max | {} / {} / {} |",
        crate::ms(crate::percentile(&all, 0.5)),
        crate::ms(crate::percentile(&all, 0.99)),
        crate::ms(all.last().copied().unwrap_or_default())
    );
    if let (Some(a), Some(b)) = (around(&times, 10), around(&times, n)) {
        println!(
            "| box {n} ÷ box 10 | {:.2} |",
            b.as_secs_f64() / a.as_secs_f64().max(1e-9)
        );
    }
    // The 11 around one box swing with whatever the host did at that moment (a file system
    // commit, the server's sampling of every box): each tenth of the run, whole, shows the trend.
    let tenths = tenths(&times);
    if let (Some(first), Some(last)) = (tenths.first(), tenths.last()) {
        println!();
        println!("| create time by tenth of the run | median ms | p90 ms | max ms |");
        println!("| --- | ---: | ---: | ---: |");
        for t in &tenths {
            println!(
                "| boxes {}–{} | {} | {} | {} |",
                t.from,
                t.to,
                crate::ms(t.median),
                crate::ms(t.p90),
                crate::ms(t.max)
            );
        }
        println!(
            "| last tenth ÷ first tenth (medians) | {:.2} | | |",
            last.median.as_secs_f64() / first.median.as_secs_f64().max(1e-9)
        );
        println!();
    }
    println!("| mounts in a box's namespace | {mounts_per_box} |");
    print_split("boxes only", &s0, &s1, n, &procs1);
    println!(
        "| boxes whose processes were found | {} of {n} |",
        n - procs1.unseen
    );
    if let (Some(s2), Some(p2)) = (&s2, &procs2) {
        print_split("boxes with their workload", &s0, s2, n, p2);
        println!(
            "| boxes whose workload is alive | {} of {n} (exec failures {workload_failed}) |",
            p2.with_workload
        );
        let used = used_kb(&s2.mem) - used_kb(&s1.mem);
        println!(
            "| the workload alone (used, with vs without) | {} |",
            per_box_kib(used, n)
        );
    }

    // Clean up: destroy every box, then check that nothing of the run is left.
    let t = Instant::now();
    ids.push(warm_id);
    for chunk in ids.chunks(16) {
        let mut set = tokio::task::JoinSet::new();
        for id in chunk {
            let (api, id) = (api.clone(), id.clone());
            set.spawn(async move {
                api.call(
                    reqwest::Method::DELETE,
                    &format!("/v1/boxes/{id}"),
                    json!(null),
                )
                .await
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok(Err(e)) = r {
                eprintln!("destroy: {e}");
            }
        }
    }
    let boxes_dir = dir.path().join("native").join("boxes");
    let cg_left = |ids: &[String]| {
        ids.iter()
            .filter(|id| berth_sandbox::native::cgroup::BoxCgroup::load(id).exists())
            .count()
    };
    let left = |ids: &[String]| {
        let dirs = std::fs::read_dir(&boxes_dir)
            .map(|d| d.count())
            .unwrap_or(0);
        (dirs, cg_left(ids), loops_under(dir.path()))
    };
    // The disk pool's ready disks stay bound until the server stops.
    let clean_deadline = Instant::now() + Duration::from_secs(300);
    while {
        let (d, c, _) = left(&ids);
        (d, c) != (0, 0)
    } && Instant::now() < clean_deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let destroyed_in = t.elapsed();
    let _ = stop_tx.send(());
    let _ = server.await;
    // The disk pool's ready disks go with the server.
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    while loops_under(dir.path()) > 0 && Instant::now() < stop_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (dirs, cgroups, loops) = left(&ids);
    let our_mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*dir.path().to_string_lossy()))
        .count();
    settle_host().await;
    let end = meminfo();
    println!();
    println!(
        "clean-up: {} boxes destroyed in {:.1} s; left behind: {dirs} box directories, {cgroups} cgroups, \
         {loops} loop devices bound to the run's disks (the disk pool's ready ones, released at exit), {our_mounts} host mounts under the data dir; \
         loop devices present {} (before the run {loops_before}); host used memory {:+.1} MiB against before the server",
        ids.len(),
        destroyed_in.as_secs_f64(),
        loop_devices(),
        (used_kb(&end) - used_kb(&before_server.mem)) as f64 / 1024.0
    );
    // The stopped server's disk pool keeps its ready disks until this process exits.
    let pool = berth_server::Config::load(o.config.as_deref())?
        .native
        .disk_pool;
    anyhow::ensure!(
        (dirs, cgroups, our_mounts) == (0, 0, 0) && loops <= pool,
        "the run left boxes behind"
    );
    Ok(())
}
