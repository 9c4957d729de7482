//! `berth-bench start`: where a session's start-up time goes, against the Claude CLI started
//! by hand, quiet and with `--busy N` boxes spinning on CPU.
//!
//! Every round runs each row once, in an order rotated per round, so that all rows see the
//! same host load. Each row is spawn (or `POST /v1/sessions`) → the mock model's first
//! request, with the CPU time its cgroup used meanwhile and the CFS throttling it met. The
//! rows peel the difference apart one cause at a time:
//!
//! - the CLI by hand, as a user would start it (root, the bench's own flags);
//! - by hand with the box's argv and environment, as the box's agent user;
//! - that, in a box-like cgroup under `berth/` (a sibling of the boxes: same weight, CPU quota
//!   and burst as a `cpus: 1.0` box), and in one at `cpus: 2.0`;
//! - `POST /v1/sessions` into an existing box, without and with the start boost, and into a
//!   box at `cpus: 2.0`.

use crate::{agents, ms, wait_requests, BenchApi};
use berth_mock_model::{scenario::Scenario, unix_ms, Mock};
use berth_sandbox::native::cgroup::BoxCgroup;
use serde_json::json;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The agent user's uid and gid in a box (and for the by-hand rows that mimic it).
const AGENT: u32 = berth_sandbox::AGENT_UID;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Row {
    ByHand,
    ByHandBoxArgs,
    ByHandBoxCgroup,
    ByHandBoxCgroup2Cpus,
    BoxNoBoost,
    BoxBoost,
    Box2CpusBoost,
}

impl Row {
    pub const ALL: [Row; 7] = [
        Row::ByHand,
        Row::ByHandBoxArgs,
        Row::ByHandBoxCgroup,
        Row::ByHandBoxCgroup2Cpus,
        Row::BoxNoBoost,
        Row::BoxBoost,
        Row::Box2CpusBoost,
    ];

    fn name(self) -> &'static str {
        match self {
            Row::ByHand => "CLI by hand (root, the bench's flags)",
            Row::ByHandBoxArgs => "CLI by hand, the box's argv and env (agent uid)",
            Row::ByHandBoxCgroup => "… in a box-like cgroup under berth/ (cpus 1.0, 1024 shares)",
            Row::ByHandBoxCgroup2Cpus => "… in a box-like cgroup, cpus 2.0",
            Row::BoxNoBoost => "POST /v1/sessions, box cpus 1.0, no start boost",
            Row::BoxBoost => "POST /v1/sessions, box cpus 1.0, start boost (default)",
            Row::Box2CpusBoost => "POST /v1/sessions, box cpus 2.0, start boost",
        }
    }
}

/// One start: wall time to the first model request, CPU used, CFS throttling met.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub wall: Duration,
    pub cpu: Duration,
    pub throttled_periods: u64,
    pub throttled: Duration,
    /// Box rows: `POST` → the CLI's process in the box.
    pub to_process: Option<Duration>,
}

pub struct Measured {
    pub rows: Vec<(Row, Vec<Sample>)>,
    pub load: (f64, f64),
    pub busy: usize,
}

impl Measured {
    pub fn walls(&self, row: Row) -> Vec<Duration> {
        self.rows
            .iter()
            .find(|(r, _)| *r == row)
            .map(|(_, v)| v.iter().map(|s| s.wall).collect())
            .unwrap_or_default()
    }
}

/// What CPU a start used: a cgroup's counters before and after.
enum Meter {
    /// A box's (or a box-like) cgroup: CPU time and throttling.
    Box(Arc<BoxCgroup>),
    /// A cpuacct-only cgroup (v1): CPU time, scheduling untouched.
    Acct(PathBuf),
    None,
}

#[derive(Clone, Copy, Default)]
struct Reading {
    cpu_ns: u64,
    periods: u64,
    throttled_ns: u64,
}

impl Meter {
    fn read(&self) -> Reading {
        match self {
            Meter::Box(cg) => {
                let (periods, throttled_ns) = cg.cpu_throttled_ns();
                Reading {
                    cpu_ns: cg.counters().cpu_usage_ns,
                    periods,
                    throttled_ns,
                }
            }
            Meter::Acct(dir) => Reading {
                cpu_ns: std::fs::read_to_string(dir.join("cpuacct.usage"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0),
                ..Default::default()
            },
            Meter::None => Reading::default(),
        }
    }

    /// The `tasks` files a forked child writes `0` to in order to join (empty: none).
    fn join_files(&self) -> Vec<PathBuf> {
        match self {
            Meter::Box(cg) => cg.join_files(),
            Meter::Acct(dir) => vec![dir.join("tasks")],
            Meter::None => Vec::new(),
        }
    }
}

fn sample(wall: Duration, a: Reading, b: Reading) -> Sample {
    Sample {
        wall,
        cpu: Duration::from_nanos(b.cpu_ns.saturating_sub(a.cpu_ns)),
        throttled_periods: b.periods.saturating_sub(a.periods),
        throttled: Duration::from_nanos(b.throttled_ns.saturating_sub(a.throttled_ns)),
        to_process: None,
    }
}

/// How a by-hand CLI is started.
struct Hand<'a> {
    cli: &'a str,
    mock: &'a Mock,
    mock_url: &'a str,
    /// The box's argv/env as the agent user (else the bench's flags as root).
    box_args: bool,
    meter: &'a Meter,
    /// A scratch directory the agent user owns.
    scratch: &'a Path,
}

impl Hand<'_> {
    async fn start(&self, n: usize) -> anyhow::Result<Sample> {
        let before = self.mock.recorded().len();
        let cfg = self.scratch.join(format!("cfg{n}"));
        let mut cmd = tokio::process::Command::new(self.cli);
        if self.box_args {
            // As `berth_agent::claude` launches it, with the environment a box's exec has.
            cmd.args([
                "-p",
                "--output-format=stream-json",
                "--input-format=stream-json",
                "--verbose",
                "--permission-prompt-tool=stdio",
                "--permission-mode=bypassPermissions",
            ])
            .env_clear()
            .envs([
                ("PATH", berth_sandbox::native::DEFAULT_PATH),
                ("USER", "agent"),
                ("LANG", "C.UTF-8"),
                ("TMPDIR", "/tmp"),
                ("ANTHROPIC_API_KEY", "sk-bench"),
                ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
                ("DISABLE_AUTOUPDATER", "1"),
                ("DISABLE_TELEMETRY", "1"),
                ("DISABLE_ERROR_REPORTING", "1"),
                ("BERTH_SESSION_ID", "sess_bench"),
                ("BERTH_SESSION_TOKEN", "tok_bench"),
                ("BERTH_API_URL", "http://127.0.0.1:47102"),
            ])
            .env("HOME", self.scratch)
            .env("ANTHROPIC_BASE_URL", self.mock_url);
        } else {
            // As root the CLI refuses bypassPermissions, so acceptEdits; the mode does not
            // change start-up.
            cmd.args([
                "-p",
                "--output-format=stream-json",
                "--input-format=stream-json",
                "--verbose",
                "--permission-mode=acceptEdits",
            ])
            .env("ANTHROPIC_BASE_URL", self.mock_url)
            .env("ANTHROPIC_API_KEY", "sk-bench")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1");
        }
        cmd.env("CLAUDE_CONFIG_DIR", &cfg)
            .current_dir(self.scratch)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let join: Vec<CString> = self
            .meter
            .join_files()
            .iter()
            .map(|p| CString::new(p.as_os_str().as_encoded_bytes()))
            .collect::<Result<_, _>>()?;
        let as_agent = self.box_args;
        // SAFETY: between fork and exec only open/write/close and the set*id calls, on strings
        // made before the fork (no allocation). The cgroup is joined first, while still root
        // (`Command::uid` would drop root before this runs).
        unsafe {
            cmd.pre_exec(move || {
                for f in &join {
                    let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let w = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if w != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if as_agent
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(AGENT) != 0
                        || libc::setuid(AGENT) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let r0 = self.meter.read();
        let t0 = unix_ms();
        let mut child = cmd.spawn()?;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
        stdin
            .write_all(
                format!(
                    "{}\n",
                    json!({"type": "user", "message": {"role": "user", "content": "be slow"},
                           "parent_tool_use_id": null})
                )
                .as_bytes(),
            )
            .await?;
        let at = wait_requests(self.mock, before + 1).await?;
        let r1 = self.meter.read();
        let _ = child.kill().await;
        Ok(sample(crate::between_unix_ms(t0, at), r0, r1))
    }
}

/// Box `bx`'s `cgroup.procs` (one hierarchy's): read every millisecond while a session starts,
/// so it must be cheap (`BoxCgroup::load` parses the mount table: a CPU cost in the bench that
/// the by-hand rows do not pay).
fn procs_file(bx: &str) -> anyhow::Result<PathBuf> {
    let f = BoxCgroup::load(bx)
        .join_files()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("box {bx} has no cgroup"))?;
    Ok(f.with_file_name("cgroup.procs"))
}

fn pids(file: &Path) -> std::collections::HashSet<u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Unix ms at which a process not in `before` first shows in `file` (polled every
/// millisecond, for at most 30 s).
async fn first_new_process(file: PathBuf, before: std::collections::HashSet<u64>) -> Option<f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if pids(&file).iter().any(|p| !before.contains(p)) {
            return Some(unix_ms());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// One session start into box `bx` (see `agents::berth_start`), with its cgroup's counters.
async fn session(api: &BenchApi, mock: &Mock, bx: &str) -> anyhow::Result<Sample> {
    let meter = Meter::Box(Arc::new(BoxCgroup::load(bx)));
    let r0 = meter.read();
    let before = mock.recorded().len();
    let procs = procs_file(bx)?;
    let watch = tokio::spawn(first_new_process(procs.clone(), pids(&procs)));
    let t0 = unix_ms();
    let s = api
        .post(
            "/v1/sessions",
            json!({"box": bx, "agent": {"kind": "claude"}, "prompt": "be slow"}),
        )
        .await?;
    let at = wait_requests(mock, before + 1).await?;
    let r1 = meter.read();
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
    while pids(&procs).len() > 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut out = sample(crate::between_unix_ms(t0, at), r0, r1);
    out.to_process = Some(crate::between_unix_ms(t0, spawned));
    Ok(out)
}

/// A cpuacct-only cgroup (cgroup v1), for the CPU time of by-hand rows without moving them
/// in the cpu hierarchy; `None` on v2 (one hierarchy: no such thing).
fn acct_only() -> Option<PathBuf> {
    if cgroups_v2() {
        return None;
    }
    let dir = PathBuf::from(format!(
        "/sys/fs/cgroup/cpuacct/berth-bench-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

fn cgroups_v2() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// Run `runs` rounds of `rows` with `busy` boxes spinning.
pub async fn measure(runs: usize, busy: usize, rows: &[Row]) -> anyhow::Result<Measured> {
    let cli = std::env::var("BERTH_CLAUDE_BIN")
        .unwrap_or_else(|_| "/opt/berth/claude-code-2.1.328/node_modules/.bin/claude".into());
    let mock = Mock::new(Scenario::demo(), Duration::ZERO);
    let mock_url = berth_mock_model::spawn_loopback(&mock).await?;
    let dir = tempfile::tempdir()?;
    let mut cfg = crate::density::server_config(None, dir.path(), &mock_url)?;
    cfg.claude_cli = Some(cli.clone().into());
    cfg.max_boxes_per_tenant = busy + 10;
    let (url, key, stop_tx, server) = crate::start_server(cfg).await?;
    let api = BenchApi::new(&url, &key);
    let mut made = Vec::new();
    // Box-like cgroups for the by-hand rows: siblings of the boxes, made as a box's is.
    let tag = std::process::id();
    let like = |cpus: f64, name: &str| {
        BoxCgroup::create(
            &format!("bench-{name}-{tag}"),
            &berth_sandbox::Limits {
                cpus,
                memory_mib: 4096,
                ..Default::default()
            },
        )
        .map(Arc::new)
    };
    let like1 = like(1.0, "cpus1")?;
    let like2 = like(2.0, "cpus2")?;
    let acct = acct_only();
    let result = rounds(
        runs, busy, rows, &cli, &mock, &mock_url, &api, &mut made, &like1, &like2, &acct,
    )
    .await;
    berth_sandbox::native::boost::set_enabled(true);
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
    for cg in [&like1, &like2] {
        if let Err(e) = cg.destroy() {
            eprintln!("removing a bench cgroup: {e}");
        }
    }
    if let Some(d) = acct {
        let _ = std::fs::remove_dir(d);
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn rounds(
    runs: usize,
    busy: usize,
    rows: &[Row],
    cli: &str,
    mock: &Mock,
    mock_url: &str,
    api: &BenchApi,
    made: &mut Vec<String>,
    like1: &Arc<BoxCgroup>,
    like2: &Arc<BoxCgroup>,
    acct: &Option<PathBuf>,
) -> anyhow::Result<Measured> {
    agents::spinners(api, busy, made).await?;
    let id = |v: &serde_json::Value| v["id"].as_str().unwrap_or_default().to_string();
    let box1 = id(&api
        .post("/v1/boxes", json!({"resources": {"memory_mib": 2048}}))
        .await?);
    made.push(box1.clone());
    let box2 = id(&api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 2048, "cpus": 2.0}}),
        )
        .await?);
    made.push(box2.clone());
    let scratch = tempfile::tempdir()?;
    std::os::unix::fs::chown(scratch.path(), Some(AGENT), Some(AGENT))?;
    let acct_meter = || match acct {
        Some(d) => Meter::Acct(d.clone()),
        None => Meter::None,
    };
    let meters = [
        acct_meter(),
        acct_meter(),
        Meter::Box(like1.clone()),
        Meter::Box(like2.clone()),
    ];
    let load0 = crate::pools::loadavg();
    let mut out: Vec<(Row, Vec<Sample>)> = rows.iter().map(|r| (*r, Vec::new())).collect();
    let mut n = 0;
    for round in 0..runs {
        for k in 0..rows.len() {
            let i = (round + k) % rows.len();
            let row = rows[i];
            n += 1;
            let hand = |box_args: bool, meter: &'static str| {
                let m = match meter {
                    "acct" => &meters[if box_args { 1 } else { 0 }],
                    "like1" => &meters[2],
                    _ => &meters[3],
                };
                Hand {
                    cli,
                    mock,
                    mock_url,
                    box_args,
                    meter: m,
                    scratch: scratch.path(),
                }
            };
            let s = match row {
                Row::ByHand => hand(false, "acct").start(n).await?,
                Row::ByHandBoxArgs => hand(true, "acct").start(n).await?,
                Row::ByHandBoxCgroup => hand(true, "like1").start(n).await?,
                Row::ByHandBoxCgroup2Cpus => hand(true, "like2").start(n).await?,
                Row::BoxNoBoost | Row::BoxBoost | Row::Box2CpusBoost => {
                    berth_sandbox::native::boost::set_enabled(row != Row::BoxNoBoost);
                    let bx = if row == Row::Box2CpusBoost {
                        &box2
                    } else {
                        &box1
                    };
                    session(api, mock, bx).await?
                }
            };
            out[i].1.push(s);
        }
    }
    Ok(Measured {
        rows: out,
        load: (load0, crate::pools::loadavg()),
        busy,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    crate::percentile(&v, 0.5)
}

pub async fn run(runs: usize, busy: usize) -> anyhow::Result<()> {
    let m = measure(runs, busy, &Row::ALL).await?;
    print(&m);
    Ok(())
}

fn print(m: &Measured) {
    println!(
        "host load (1-min loadavg, 2 cores) before {:.2}, after {:.2}; {} boxes spinning",
        m.load.0, m.load.1, m.busy
    );
    println!();
    println!(
        "| start → first model request | n | median ms | min–max ms | CPU ms (median) | throttled: periods, ms (median) | POST → CLI process ms |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut med = std::collections::HashMap::new();
    for (row, v) in &m.rows {
        let walls: Vec<Duration> = v.iter().map(|s| s.wall).collect();
        let wm = median(walls.clone());
        med.insert(*row, wm);
        let min = walls.iter().min().copied().unwrap_or_default();
        let max = walls.iter().max().copied().unwrap_or_default();
        let periods = {
            let mut p: Vec<u64> = v.iter().map(|s| s.throttled_periods).collect();
            p.sort();
            p.get(p.len() / 2).copied().unwrap_or(0)
        };
        let to_process: Vec<Duration> = v.iter().filter_map(|s| s.to_process).collect();
        println!(
            "| {} | {} | {} | {}–{} | {} | {}, {} | {} |",
            row.name(),
            v.len(),
            ms(wm),
            ms(min),
            ms(max),
            ms(median(v.iter().map(|s| s.cpu).collect())),
            periods,
            ms(median(v.iter().map(|s| s.throttled).collect())),
            if to_process.is_empty() {
                "".to_string()
            } else {
                ms(median(to_process))
            }
        );
    }
    let diff = |a: Row, b: Row| -> Option<String> {
        let (x, y) = (med.get(&a)?, med.get(&b)?);
        Some(format!(
            "{:+.1}",
            (x.as_secs_f64() - y.as_secs_f64()) * 1000.0
        ))
    };
    println!();
    println!("| difference of medians | ms |");
    println!("| --- | ---: |");
    for (what, a, b) in [
        ("box argv/env and agent uid (by hand)", Row::ByHandBoxArgs, Row::ByHand),
        (
            "a box-like cgroup: sibling weight, quota (by hand)",
            Row::ByHandBoxCgroup,
            Row::ByHandBoxArgs,
        ),
        (
            "quota cpus 1.0 against 2.0 (by hand, box-like cgroup)",
            Row::ByHandBoxCgroup,
            Row::ByHandBoxCgroup2Cpus,
        ),
        (
            "the box itself: API, exec path, namespaces, gateway (no boost, against by hand in a box-like cgroup)",
            Row::BoxNoBoost,
            Row::ByHandBoxCgroup,
        ),
        ("the start boost", Row::BoxBoost, Row::BoxNoBoost),
        ("box cpus 2.0 against 1.0 (boosted)", Row::Box2CpusBoost, Row::BoxBoost),
        ("added by berth, no boost", Row::BoxNoBoost, Row::ByHand),
        ("added by berth, default (boost)", Row::BoxBoost, Row::ByHand),
    ] {
        if let Some(d) = diff(a, b) {
            println!("| {what} | {d} |");
        }
    }
}
