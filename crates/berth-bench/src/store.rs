//! The stores under load, SQLite and PostgreSQL in the same run (issue 19): GET latency with
//! 1,000 boxes stored, SSE delivery at 500 subscribers (the `api` suite's measurement), usage
//! summed over 1,000,000 usage rows, and park/restore of a hybrid box to S3 with the server's
//! RSS during a large park.
//!
//! The bench starts what it measures against: a throw-away PostgreSQL cluster
//! (`berth_store::testing::PgCluster`), an S3 server — moto's from the test venv (`scripts/test`
//! installs it) or, with `--s3s-fs`, the s3s project's — and each server in a child process of
//! its own (`store-server`), so that its RSS is the server's alone and the bench's clients do
//! not share its runtime. Each park has a peer in the same run: the same number of bytes put
//! straight to the S3 server, which is the floor the server itself sets.

use crate::api::{self, Api};
use crate::{ms, percentile, print_table, summarize, Summary};
use berth_store::{Store, UsageFilter, UsageKey, UsageRow};
use serde_json::json;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BUCKET: &str = "berth-bench";
const HOUR_MS: i64 = 3_600_000;

#[derive(clap::Args)]
pub struct Opts {
    /// Park/restore runs.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Runs of the big park (0: none).
    #[arg(long, default_value_t = 1)]
    pub big_runs: usize,
    #[arg(long, default_value_t = 500)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 1_000_000)]
    pub usage_rows: usize,
    #[arg(long, default_value_t = 100)]
    pub park_mib: usize,
    /// The park whose server RSS is watched, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub big_park_mib: usize,
    /// The test venv with moto[server].
    #[arg(long, default_value = "/opt/berth/test-venv")]
    pub venv: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub stores: Vec<String>,
    /// An `s3s-fs` binary (`cargo install s3s-fs --features binary`, the s3s project's S3
    /// server on a directory): the snapshots go there instead of to moto. moto, a Python
    /// server, takes ~1.2 s to ingest 100 MiB by itself (the peer row shows it).
    #[arg(long)]
    pub s3s_fs: Option<PathBuf>,
}

/// The `store-server` child: a berth server on loopback over the given stores (the AWS
/// variables come from the environment); prints `<url> <admin key>` once up.
pub async fn serve(
    data_dir: PathBuf,
    database_url: Option<String>,
    snapshot_url: Option<String>,
) -> anyhow::Result<()> {
    let mut cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir,
        database_url,
        snapshot_url,
        ..Default::default()
    };
    // Every subscriber comes from loopback: one peer address for the per-peer cap (256).
    cfg.listener.max_connections_per_peer = 4096;
    cfg.listener.max_connections = cfg.listener.max_connections.max(4096);
    let (url, key, _stop, server) = crate::start_server(cfg).await?;
    println!("{url} {key}");
    server.await?;
    Ok(())
}

/// The S3 server the snapshots go to, on a free loopback port (killed on drop), with the
/// bench's bucket: moto's (default) or s3s-fs's.
struct S3Server {
    _child: tokio::process::Child,
    addr: SocketAddr,
    name: String,
    _root: Option<tempfile::TempDir>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl S3Server {
    /// s3s-fs on a temporary directory (its buckets are directories: the bench's is made
    /// first), with the bench's credentials; up once it takes a connection.
    async fn start_s3s_fs(bin: &Path) -> anyhow::Result<S3Server> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir(root.path().join(BUCKET))?;
        let port = free_port()?;
        let child = tokio::process::Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "bench", "--secret-key", "bench"])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "s3s-fs did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(S3Server {
            _child: child,
            addr,
            name: format!("s3s-fs ({})", bin.display()),
            _root: Some(root),
        })
    }

    async fn start(venv: &Path) -> anyhow::Result<S3Server> {
        let bin = venv.join("bin/moto_server");
        anyhow::ensure!(
            bin.exists(),
            "{} missing (scripts/test installs moto[server] into the test venv)",
            bin.display()
        );
        let port = free_port()?;
        let child = tokio::process::Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Create the bucket (moto takes unsigned requests), which also proves it is up.
        loop {
            if let Ok(r) = http.put(format!("http://{addr}/{BUCKET}")).send().await {
                anyhow::ensure!(r.status().is_success(), "create bucket: {}", r.status());
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "moto did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(S3Server {
            _child: child,
            addr,
            name: format!("moto_server ({})", venv.display()),
            _root: None,
        })
    }
}

impl S3Server {
    /// The peer of a park: `mib` MiB of random bytes straight to the S3 server as one multipart
    /// object, with berth's part size and parts in flight, through the same S3 client
    /// (`object_store`) — no box, no tar, no compression, no read-back. What the server itself
    /// takes to ingest the bytes.
    async fn raw_put(&self, key: &str, mib: usize) -> anyhow::Result<Duration> {
        use object_store::{ObjectStoreExt, WriteMultipart};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(format!("http://{}", self.addr))
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id("bench")
            .with_secret_access_key("bench")
            .build()?;
        let part = berth_store::snapshots::PART_BYTES;
        let data = random_bytes(mib << 20);
        let t = Instant::now();
        let upload = s3.put_multipart(&key.into()).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, part);
        for chunk in data.chunks(1 << 20) {
            w.wait_for_capacity(berth_store::snapshots::PARTS_IN_FLIGHT)
                .await?;
            w.write(chunk);
        }
        w.finish().await?;
        let took = t.elapsed();
        s3.delete(&key.into()).await?;
        Ok(took)
    }
}

/// `n` bytes that do not compress (xorshift: the bench needs no cryptographic randomness).
fn random_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ now_ms() as u64;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A server in a child process; killed on drop.
struct Child {
    child: std::process::Child,
    api: Api,
}

impl Child {
    fn start(
        data: &Path,
        database_url: Option<&str>,
        snapshot_url: &str,
        s3: &S3Server,
    ) -> anyhow::Result<Child> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["store-server", "--data-dir"])
            .arg(data)
            .args(["--snapshot-url", snapshot_url]);
        if let Some(u) = database_url {
            cmd.args(["--database-url", u]);
        }
        let mut child = cmd
            .env("AWS_ENDPOINT_URL", format!("http://{}", s3.addr))
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let (url, key) = (parts.next(), parts.next());
        let (Some(url), Some(key)) = (url, key) else {
            let _ = child.kill();
            anyhow::bail!("store-server did not start: {line:?}");
        };
        Ok(Child {
            api: Api::new(url, key),
            child,
        })
    }

    fn rss_kib(&self) -> u64 {
        crate::files::rss_kib(self.child.id())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The usage rows: `n` requests of 2,000 sessions (one box each) of 10 tenants on 3 models;
/// each session's requests fall within 2 hours, the sessions spread over the 30 days before
/// `now_ms`. (The rollup holds a row per session, model and hour: ~6 per session here.)
fn usage_rows(n: usize, now_ms: i64) -> impl Iterator<Item = UsageRow> {
    const SESSIONS: usize = 2000;
    let span = 30 * 24 * HOUR_MS;
    let per = n.div_ceil(SESSIONS).max(1);
    (0..n).map(move |i| {
        let s = i / per;
        let j = (i % per) as i64;
        let start = now_ms - span + (s as i64 * span / SESSIONS as i64);
        let ts_ms = start + j * 2 * HOUR_MS / per as i64;
        UsageRow {
            ts: String::new(),
            ts_ms,
            tenant: format!("tenant{}", s % 10),
            box_id: format!("box-usage{s:04}"),
            session_id: format!("ses-usage{s:04}"),
            model: ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"][i % 3].into(),
            status: 200,
            input_tokens: 1000 + (i % 97) as u64,
            output_tokens: 200 + (i % 13) as u64,
            cache_creation_5m_tokens: 0,
            cache_creation_1h_tokens: 0,
            cache_read_tokens: 5000,
            cost_usd: 0.0042,
        }
    })
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The sums straight from the rows, as `usage_sums` read them before the hourly rollup
/// (migration sqlite 0010 / postgres 0005): the "before" of the usage rows.
async fn rows_scan(st: &StoreHandle) -> anyhow::Result<()> {
    const SQL: &str = "SELECT tenant AS k, model, COUNT(*) AS n, SUM(input_tokens) AS i,
        SUM(output_tokens) AS o, SUM(cache_creation_5m_tokens) AS c5,
        SUM(cache_creation_1h_tokens) AS c1, SUM(cache_read_tokens) AS cr, SUM(cost_usd) AS usd
        FROM usage GROUP BY k, model ORDER BY k, model";
    match st {
        StoreHandle::Sqlite(s) => drop(sqlx::query(SQL).fetch_all(s.pool()).await?),
        StoreHandle::Postgres(s) => drop(sqlx::query(SQL).fetch_all(s.pool()).await?),
    }
    Ok(())
}

enum StoreHandle {
    Sqlite(berth_store::SqliteStore),
    Postgres(berth_store::PostgresStore),
}

impl StoreHandle {
    fn store(&self) -> &dyn Store {
        match self {
            StoreHandle::Sqlite(s) => s,
            StoreHandle::Postgres(s) => s,
        }
    }
}

/// Everything measured on one store.
struct Figures {
    store: String,
    /// The host's 1-minute load average when this store's run began and ended.
    load: (f64, f64),
    fill_s: f64,
    gets: Vec<Summary>,
    sse: Vec<Duration>,
    usage: Vec<Summary>,
    park: Vec<Duration>,
    restore: Vec<Duration>,
    /// The same bytes straight to the S3 server ([`S3Server::raw_put`]), interleaved with the parks.
    raw_put: Vec<Duration>,
    big: Vec<Result<BigPark, String>>,
}

struct BigPark {
    park: Duration,
    restore: Duration,
    base_mib: f64,
    park_growth_mib: f64,
    restore_growth_mib: f64,
}

pub async fn run(o: Opts) -> anyhow::Result<()> {
    let load0 = load();
    let s3 = match &o.s3s_fs {
        Some(bin) => S3Server::start_s3s_fs(bin).await?,
        None => S3Server::start(&o.venv).await?,
    };
    let pg = tokio::task::spawn_blocking(berth_store::testing::PgCluster::start).await??;
    for kind in &o.stores {
        let f = one_store(&o, kind, &s3, &pg).await?;
        print(&o, &f);
    }
    println!(
        "\nhost 1-minute load average {load0:.2} → {:.2}; S3: {}, \
         PostgreSQL: a throw-away cluster (fsync off), each server a child process",
        load(),
        s3.name
    );
    Ok(())
}

/// One store's figures as Markdown, printed as soon as they are measured.
fn print(o: &Opts, f: &Figures) {
    println!(
        "\n### {} (host load average {:.1} → {:.1})\n",
        f.store, f.load.0, f.load.1
    );
    println!(
        "{} usage rows recorded in {:.1} s (batches of 10,000, the hourly rollup kept by its trigger)\n",
        o.usage_rows, f.fill_s
    );
    print_table("request", &f.gets);
    println!();
    println!(
        "| SSE delivery, {} subscribers, {} sessions | events | median ms | p99 ms | max ms |",
        o.subscribers,
        api::SSE_SESSIONS
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| event `ts` (before the commit) → client | {} | {} | {} | {} |",
        f.sse.len(),
        ms(percentile(&f.sse, 0.5)),
        ms(percentile(&f.sse, 0.99)),
        ms(f.sse.last().copied().unwrap_or_default())
    );
    println!();
    print_table(&format!("usage over {} rows", o.usage_rows), &f.usage);
    println!();
    println!(
        "| hybrid box, {} MiB workspace | n | median ms | max ms | runs ms |",
        o.park_mib
    );
    println!("| --- | ---: | ---: | ---: | --- |");
    let raw = format!(
        "peer: the same bytes straight to the S3 server (object_store multipart, {} MiB parts, {} in flight)",
        berth_store::snapshots::PART_BYTES >> 20,
        berth_store::snapshots::PARTS_IN_FLIGHT
    );
    for (name, v) in [
        ("park to S3", &f.park),
        ("restore from S3 (exec on the parked box)", &f.restore),
        (raw.as_str(), &f.raw_put),
    ] {
        let s = summarize(name, v.clone());
        println!(
            "| {name} | {} | {} | {} | {} |",
            s.n,
            ms(s.median),
            ms(v.iter().max().copied().unwrap_or_default()),
            v.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
        );
    }
    let median = |v: &[Duration]| summarize("", v.to_vec()).median.as_secs_f64();
    if !f.raw_put.is_empty() {
        println!(
            "| park ÷ peer (medians) | | {:.2} | | |",
            median(&f.park) / median(&f.raw_put).max(1e-9)
        );
    }
    println!();
    println!(
        "| {} MiB park | park s | restore s | server RSS before MiB | growth during park MiB | growth during restore MiB |",
        o.big_park_mib
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, b) in f.big.iter().enumerate() {
        match b {
            Ok(b) => println!(
                "| {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |",
                i + 1,
                b.park.as_secs_f64(),
                b.restore.as_secs_f64(),
                b.base_mib,
                b.park_growth_mib,
                b.restore_growth_mib
            ),
            Err(e) => println!("| {} | failed: {e} | | | | |", i + 1),
        }
    }
}

async fn one_store(
    o: &Opts,
    kind: &str,
    s3: &S3Server,
    pg: &berth_store::testing::PgCluster,
) -> anyhow::Result<Figures> {
    let load0 = load();
    let dir = tempfile::tempdir()?;
    let database_url = match kind {
        "sqlite" => None,
        "postgres" => Some(
            berth_store::postgres::ensure_database(
                &pg.url(),
                &format!("bench_{}", std::process::id()),
            )
            .await?,
        ),
        other => anyhow::bail!("--stores: sqlite or postgres, not {other:?}"),
    };
    let handle = match &database_url {
        None => {
            StoreHandle::Sqlite(berth_store::SqliteStore::open(&dir.path().join("berth.db")).await?)
        }
        Some(u) => StoreHandle::Postgres(berth_store::PostgresStore::open(u).await?),
    };
    let st = handle.store();
    eprintln!(
        "{kind}: storing 1,000 boxes and {} usage rows",
        o.usage_rows
    );
    api::store_boxes(st).await?;
    let now = now_ms();
    let t = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for r in usage_rows(o.usage_rows, now) {
        batch.push(r);
        if batch.len() == 10_000 {
            st.record_usage(&batch).await?;
            batch.clear();
        }
    }
    st.record_usage(&batch).await?;
    let fill_s = t.elapsed().as_secs_f64();

    let server = Child::start(
        dir.path(),
        database_url.as_deref(),
        &format!("s3://{BUCKET}/{kind}"),
        s3,
    )?;
    let api = &server.api;
    let live = api::live_box(api).await?;
    eprintln!("{kind}: GETs");
    let gets = api::get_rows(api, &live).await?;
    eprintln!("{kind}: SSE with {} subscribers", o.subscribers);
    let sse = api::sse_latencies(api, &live, o.subscribers).await?;

    eprintln!("{kind}: usage");
    let mut usage = Vec::new();
    // A window that cuts hours on both ends, within the rows' 30 days.
    let from = rfc3339(now - 20 * 24 * HOUR_MS + 17 * 60_000);
    let to = rfc3339(now - 3 * 24 * HOUR_MS - 3 * 60_000);
    for (name, path) in [
        (
            "GET /v1/usage (every tenant, by tenant)",
            "/v1/usage".to_string(),
        ),
        (
            "GET /v1/usage?group_by=session (2,000 sessions)",
            "/v1/usage?group_by=session".to_string(),
        ),
        (
            "GET /v1/usage?group_by=model&tenant=…, a 17-day window cutting hours",
            format!("/v1/usage?group_by=model&tenant=tenant3&from={from}&to={to}"),
        ),
        (
            "GET /v1/tenants/{name} (its month's spend)",
            "/v1/tenants/tenant3".to_string(),
        ),
    ] {
        let mut v = Vec::new();
        for _ in 0..20 {
            v.push(api.timed_get(&path).await?);
        }
        usage.push(summarize(name, v));
    }
    let mut v = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        st.usage_sums(UsageKey::Tenant, &UsageFilter::default())
            .await?;
        v.push(t.elapsed());
    }
    usage.push(summarize(
        "Store::usage_sums by tenant, no window (in process)",
        v,
    ));
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        rows_scan(&handle).await?;
        v.push(t.elapsed());
    }
    usage.push(summarize(
        "the same sums from the rows alone (the query before the rollup)",
        v,
    ));

    eprintln!("{kind}: park and restore of {} MiB", o.park_mib);
    let (mut park, mut restore, mut raw_put) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..o.runs {
        raw_put.push(s3.raw_put(&format!("raw-{kind}-{i}"), o.park_mib).await?);
        let bx = filled_box(api, o.park_mib).await?;
        let (p, r) = (park_box(api, &bx).await?, restore_box(api, &bx).await?);
        park.push(p);
        restore.push(r);
        delete_box(api, &bx).await?;
    }
    eprintln!(
        "{kind}: park of {} MiB with the server's RSS",
        o.big_park_mib
    );
    let mut big = Vec::new();
    for _ in 0..o.big_runs {
        let bx = filled_box(api, o.big_park_mib).await?;
        big.push(big_park(&server, &bx).await.map_err(|e| e.to_string()));
        delete_box(api, &bx).await?;
    }
    drop(server);
    Ok(Figures {
        store: match kind {
            "sqlite" => "SQLite (embedded, durability crash)".into(),
            _ => "PostgreSQL (one server on it)".into(),
        },
        load: (load0, load()),
        fill_s,
        gets,
        sse,
        usage,
        park,
        restore,
        raw_put,
        big,
    })
}

/// Park and restore `bx` while watching the server's RSS.
async fn big_park(server: &Child, bx: &str) -> anyhow::Result<BigPark> {
    let base = server.rss_kib();
    let (p, park_peak) = sampling_rss(server, park_box(&server.api, bx)).await;
    let p = p?;
    let before_restore = server.rss_kib();
    let (r, restore_peak) = sampling_rss(server, restore_box(&server.api, bx)).await;
    Ok(BigPark {
        park: p,
        restore: r?,
        base_mib: base as f64 / 1024.0,
        park_growth_mib: park_peak.saturating_sub(base) as f64 / 1024.0,
        restore_growth_mib: restore_peak.saturating_sub(before_restore) as f64 / 1024.0,
    })
}

/// Run `f` while sampling the server's RSS every 10 ms; `f`'s result and the highest RSS seen.
async fn sampling_rss<T>(server: &Child, f: impl std::future::Future<Output = T>) -> (T, u64) {
    let mut peak = server.rss_kib();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut f = std::pin::pin!(f);
    loop {
        tokio::select! {
            v = &mut f => return (v, peak.max(server.rss_kib())),
            _ = tick.tick() => peak = peak.max(server.rss_kib()),
        }
    }
}

/// A hybrid box whose workspace holds `mib` MiB of random bytes (incompressible).
async fn filled_box(api: &Api, mib: usize) -> anyhow::Result<String> {
    let disk = (mib as u64 * 3 + 512).max(1024);
    let bx = api
        .post(
            "/v1/boxes",
            json!({"lifecycle": "hybrid", "idle_timeout_s": 3600,
                   "resources": {"memory_mib": 1024, "disk_mib": disk}}),
        )
        .await?;
    let bx = bx["id"].as_str().unwrap_or_default().to_string();
    let out = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": ["sh", "-c", format!("head -c {} /dev/urandom > /workspace/blob", mib << 20)],
                   "timeout_s": 600}),
        )
        .await?;
    anyhow::ensure!(out["exit_code"] == 0, "filling the workspace: {out}");
    Ok(bx)
}

async fn park_box(api: &Api, bx: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let parked = api.post(&format!("/v1/boxes/{bx}/park"), json!({})).await?;
    let took = t.elapsed();
    anyhow::ensure!(parked["state"] == "parked", "park: {parked}");
    Ok(took)
}

/// An exec on a parked box: restore, then `true`.
async fn restore_box(api: &Api, bx: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = api
        .post(&format!("/v1/boxes/{bx}/exec"), json!({"argv": ["true"]}))
        .await?;
    let took = t.elapsed();
    anyhow::ensure!(out["exit_code"] == 0, "restore: {out}");
    Ok(took)
}

async fn delete_box(api: &Api, bx: &str) -> anyhow::Result<()> {
    let r = api
        .http
        .delete(format!("{}/v1/boxes/{bx}", api.url))
        .bearer_auth(&api.token)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "delete: {}", r.status());
    Ok(())
}
