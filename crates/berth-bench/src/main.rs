//! `berth-bench`: berth measured against its peers in the same run. Needs root.
//!
//! ```text
//! cargo run --release -p berth-bench -- sandbox [--runs 200]
//! cargo run --release -p berth-bench -- api
//! cargo run --release -p berth-bench -- gateway
//! cargo run --release -p berth-bench -- agents [--runs 20 --concurrent 50]
//! cargo run --release -p berth-bench -- park [--runs 5 --mib 100]
//! cargo run --release -p berth-bench -- flood [--runs 3 --execs 200 --per-port 200]
//! cargo run --release -p berth-bench -- start [--runs 10 --busy 2]
//! cargo run --release -p berth-bench -- pools [--runs 10]
//! cargo run --release -p berth-bench -- check [--runs 3]
//! cargo run --release -p berth-bench -- managed [--runs 5 --subscribers 500 --messages 10]
//! cargo run --release -p berth-bench -- cluster --database-url postgres://… [--runs 3]
//! cargo run --release -p berth-bench -- density [--boxes 5000]
//! cargo run --release -p berth-bench -- store [--runs 3 --usage-rows 1000000]
//! ```
//! Each prints a Markdown table for BENCHMARKS.md.

mod agents;
mod api;
mod check;
mod cluster;
mod density;
mod files;
mod flood;
mod gateway;
mod managed;
mod park;
mod pools;
mod sandbox;
mod sdk;
mod start;
mod store;

use clap::{Parser, Subcommand};
use std::time::Duration;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Box create → exec /bin/true → destroy, against unshare, bwrap and docker run.
    Sandbox {
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Runs for `docker run` (slow); 0 skips it.
        #[arg(long, default_value_t = 200)]
        docker_runs: usize,
    },
    /// GET latency with 1,000 boxes stored, SSE delivery with 500 subscribers, memory per session.
    Api {
        #[arg(long, default_value_t = 500)]
        subscribers: usize,
        /// Store durability: crash (default) or power.
        #[arg(long, default_value = "crash")]
        durability: String,
    },
    /// Session start against the CLI started by hand; many concurrent real-CLI sessions.
    Agents {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 50)]
        concurrent: usize,
        /// A berth config file for the bench's server (else defaults and `BERTH_*`).
        #[arg(long)]
        server_config: Option<std::path::PathBuf>,
        /// The server's `max_boxes_per_tenant` (default: room for the run).
        #[arg(long)]
        max_boxes_per_tenant: Option<usize>,
        /// Boxes spinning on CPU during the run (a busy host), 0 for none.
        #[arg(long, default_value_t = 0)]
        spinners: usize,
        /// Idle sessions in hybrid boxes to park (memory given back), 0 for none.
        #[arg(long, default_value_t = 0)]
        parked: usize,
    },
    /// Idle persistent boxes, each with a sleeping process: memory per box, create time of the
    /// Nth against the 10th, what limits the count. Destroys every box it made.
    Density {
        #[arg(long, default_value_t = 1000)]
        boxes: usize,
        /// Creates (and workload execs) in flight at once.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        #[arg(long, default_value_t = 5120)]
        disk_mib: u64,
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        /// Stop creating boxes after this long (then measure and clean up).
        #[arg(long, default_value_t = 900)]
        max_seconds: u64,
        /// A berth config file for the bench's server (else defaults and `BERTH_*`).
        #[arg(long)]
        server_config: Option<std::path::PathBuf>,
        /// The server's `max_boxes_per_tenant` (default: room for the run).
        #[arg(long)]
        max_boxes_per_tenant: Option<usize>,
        /// Boxes only, no sleeping process in them.
        #[arg(long)]
        no_workload: bool,
    },
    /// An Agent SDK app's first answer: the SDK's local transport against BerthTransport.
    Sdk {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// A Python with claude-agent-sdk and websockets installed.
        #[arg(long, default_value = "/opt/berth/test-venv/bin/python")]
        python: String,
    },
    /// Hybrid boxes: park and restore with a large workspace; a resumed agent against a fresh one.
    Park {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Workspace size in MiB (random bytes).
        #[arg(long, default_value_t = 100)]
        mib: usize,
    },
    /// Where a session's start-up time goes: the CLI by hand, by hand with the box's argv and
    /// cgroup, the box with and without the start boost; CPU time and throttling per row.
    Start {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Boxes spinning on CPU during the run (a busy host), 0 for none.
        #[arg(long, default_value_t = 0)]
        busy: usize,
    },
    /// Warm pool take against a CLI pre-started by hand and a cold session, same run.
    Pools {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// SPECIFICATION.md's ratios with short runs; exits non-zero when one breaks its ceiling.
    Check {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The Managed Agents API against berth's own: first model request, stream delivery.
    Managed {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 500)]
        subscribers: usize,
        /// Turns (one `agent.message` each) per stream round.
        #[arg(long, default_value_t = 10)]
        messages: usize,
    },
    /// Stream subscribers for the `managed` suite (internal).
    #[command(hide = true)]
    ManagedClients {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        path: String,
        #[arg(long)]
        kind: String,
        #[arg(long)]
        subscribers: usize,
        #[arg(long)]
        messages: usize,
    },
    /// SSE subscribers for the `api` suite (internal).
    #[command(hide = true)]
    SseClients {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, value_delimiter = ',')]
        sessions: Vec<String>,
        #[arg(long)]
        subscribers: usize,
        #[arg(long)]
        messages: usize,
    },
    /// Model gateway against straight-to-upstream: time to first byte, throughput, CPU.
    Gateway {
        #[arg(long, default_value_t = 1000)]
        requests: usize,
    },
    /// A file-heavy workload inside a box (write then read N small files) on every backend.
    Io {
        #[arg(long, default_value_t = 10000)]
        files: usize,
    },
    /// Server RSS idle and while `clients` clients GET one `mib` MiB file in parallel.
    Files {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 12)]
        clients: usize,
        #[arg(long, default_value_t = 250)]
        mib: u64,
    },
    /// Another tenant's exec latency while one box floods its gateway, egress and API sockets.
    Flood {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Execs of `/bin/true` per phase (idle before, during the flood, idle after).
        #[arg(long, default_value_t = 200)]
        execs: usize,
        /// Connections the flooding box keeps open to each of its three sockets.
        #[arg(long, default_value_t = 200)]
        per_port: usize,
    },
    /// Three nodes on one PostgreSQL: forwarding overhead (exec, port TTFB), placement's
    /// cost, node death → hybrid boxes restorable elsewhere.
    Cluster {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Requests per path and run for the forwarding figures.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// A PostgreSQL server (a database is created on it), e.g. `postgres://postgres@127.0.0.1/postgres`.
        #[arg(long, env = "BERTH_TEST_DATABASE_URL")]
        database_url: String,
    },
    /// One node of the `cluster` suite, in a process of its own (internal).
    #[command(hide = true)]
    ClusterNode {
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        db: String,
        #[arg(long)]
        snapshots: String,
        #[arg(long)]
        lease_ms: u64,
    },
    /// SQLite and PostgreSQL in the same run: GETs with 1,000 boxes, SSE at 500 subscribers,
    /// usage over 1,000,000 rows; park/restore to S3 (moto) and the server's RSS in a big park.
    Store(store::Opts),
    /// The server for the `store` suite, in a process of its own (internal).
    #[command(hide = true)]
    StoreServer {
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long)]
        database_url: Option<String>,
        #[arg(long)]
        snapshot_url: Option<String>,
    },
    /// The server for the `files` suite, in a process of its own (internal).
    #[command(hide = true)]
    FilesServer {
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

/// A berth server in this process; returns its URL, admin key, and a stop handle.
pub async fn start_server(
    cfg: berth_server::Config,
) -> anyhow::Result<(
    String,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let helper = berth_sandbox::native::helper_beside(&std::env::current_exe()?);
    let server = tokio::spawn(async move {
        let r = berth_server::run(
            cfg,
            berth_server::Runtime::new(helper),
            move |s| {
                let _ = tx.send((
                    s.addr,
                    std::fs::read_to_string(&s.admin_key_file).unwrap_or_default(),
                ));
            },
            async move {
                let _ = stop_rx.await;
            },
        )
        .await;
        if let Err(e) = r {
            eprintln!("server: {e}");
        }
    });
    let (addr, key) = rx.await?;
    Ok((
        format!("http://{addr}"),
        key.trim().to_string(),
        stop_tx,
        server,
    ))
}

/// Authenticated JSON calls to the server under test.
#[derive(Clone)]
pub struct BenchApi {
    pub http: reqwest::Client,
    pub url: String,
    pub key: String,
}

impl BenchApi {
    pub fn new(url: &str, key: &str) -> BenchApi {
        BenchApi {
            http: reqwest::Client::new(),
            url: url.to_string(),
            key: key.to_string(),
        }
    }

    /// The response's JSON (`null` when it has none); an error, with the body, unless 2xx.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let what = format!("{method} {path}");
        let r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "{what}: {}: {}",
            r.status(),
            r.text().await?
        );
        Ok(r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        self.call(reqwest::Method::POST, path, body).await
    }

    /// POST, and the time from the call until the mock model receives its next request (from
    /// the agent the call started or woke), with the response.
    pub async fn post_until_model_request(
        &self,
        mock: &berth_mock_model::Mock,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<(Duration, serde_json::Value)> {
        let before = mock.recorded().len();
        let t0 = berth_mock_model::unix_ms();
        let r = self.post(path, body).await?;
        let at = wait_requests(mock, before + 1).await?;
        Ok((between_unix_ms(t0, at), r))
    }
}

/// When the mock model received its `n`th request (unix ms); waits up to a minute.
pub async fn wait_requests(mock: &berth_mock_model::Mock, n: usize) -> anyhow::Result<f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen = mock.recorded();
        if seen.len() >= n {
            return Ok(seen[n - 1].received_unix_ms);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no model request");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

pub struct Summary {
    pub name: String,
    pub median: Duration,
    pub p99: Duration,
    pub n: usize,
}

/// Print summaries as a Markdown table (median and p99 in ms) under the header `what`.
pub fn print_table<'a>(what: &str, rows: impl IntoIterator<Item = &'a Summary>) {
    println!("| {what} | n | median ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} |",
            r.name,
            r.n,
            ms(r.median),
            ms(r.p99)
        );
    }
}

/// The time from `t0` to `at`, both unix milliseconds (clamped at zero).
pub fn between_unix_ms(t0: f64, at: f64) -> Duration {
    Duration::from_secs_f64((at - t0).max(0.0) / 1000.0)
}

pub fn summarize(name: &str, mut v: Vec<Duration>) -> Summary {
    v.sort();
    Summary {
        name: name.to_string(),
        median: percentile(&v, 0.5),
        p99: percentile(&v, 0.99),
        n: v.len(),
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("__box-init") {
        berth_sandbox::native::init::run();
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Sandbox { runs, docker_runs } => sandbox::run(runs, docker_runs).await,
            Cmd::Api {
                subscribers,
                durability,
            } => api::run(subscribers, durability).await,
            Cmd::Gateway { requests } => gateway::run(requests).await,
            Cmd::Io { files } => sandbox::io(files).await,
            Cmd::Files { runs, clients, mib } => files::run(runs, clients, mib).await,
            Cmd::FilesServer { data_dir } => files::serve(data_dir).await,
            Cmd::Cluster {
                runs,
                requests,
                database_url,
            } => cluster::run(runs, requests, database_url).await,
            Cmd::ClusterNode {
                data_dir,
                name,
                db,
                snapshots,
                lease_ms,
            } => cluster::node(data_dir, name, db, snapshots, lease_ms).await,
            Cmd::Flood {
                runs,
                execs,
                per_port,
            } => flood::run(runs, execs, per_port).await,
            Cmd::Agents {
                runs,
                concurrent,
                server_config,
                max_boxes_per_tenant,
                spinners,
                parked,
            } => {
                agents::run(agents::Opts {
                    runs,
                    concurrent,
                    server_config,
                    max_boxes_per_tenant,
                    spinners,
                    parked,
                })
                .await
            }
            Cmd::Density {
                boxes,
                parallel,
                disk_mib,
                memory_mib,
                max_seconds,
                server_config,
                max_boxes_per_tenant,
                no_workload,
            } => {
                density::run(density::Opts {
                    boxes,
                    parallel,
                    disk_mib,
                    memory_mib,
                    max_seconds,
                    config: server_config,
                    max_boxes_per_tenant,
                    workload: !no_workload,
                })
                .await
            }
            Cmd::Park { runs, mib } => park::run(runs, mib).await,
            Cmd::Sdk { runs, python } => sdk::run(runs, python).await,
            Cmd::Pools { runs } => pools::run(runs).await,
            Cmd::Start { runs, busy } => start::run(runs, busy).await,
            Cmd::Check { runs } => check::run(runs).await,
            Cmd::Managed {
                runs,
                subscribers,
                messages,
            } => managed::run(runs, subscribers, messages).await,
            Cmd::ManagedClients {
                url,
                token,
                path,
                kind,
                subscribers,
                messages,
            } => managed::clients(url, token, path, kind, subscribers, messages).await,
            Cmd::Store(opts) => store::run(opts).await,
            Cmd::StoreServer {
                data_dir,
                database_url,
                snapshot_url,
            } => store::serve(data_dir, database_url, snapshot_url).await,
            Cmd::SseClients {
                url,
                token,
                sessions,
                subscribers,
                messages,
            } => api::sse_clients(url, token, sessions, subscribers, messages).await,
        }
    })
}
