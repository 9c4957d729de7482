//! `berth`: the server, the CLI client and the model stand-in in one binary.

mod client;
mod render;
mod store_cmd;

use anyhow::{bail, Context, Result};
use berth_api::*;
use clap::{Args, Parser, Subcommand};
use client::Client;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Run AI agents in isolated sandboxes on your own machines",
    after_help = "The client commands find the server and its admin key the way `berth serve` was configured: $BERTH_DATA_DIR, else data_dir in $BERTH_CONFIG, else the default data dir. From another machine set BERTH_URL and BERTH_TOKEN."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a client command reaches the server.
#[derive(Args, Clone, Default)]
struct Conn {
    /// Server URL, e.g. http://127.0.0.1:7700 [default: $BERTH_URL, else the local server's
    /// address from its data dir]
    #[arg(long)]
    url: Option<String>,
    /// API key [default: $BERTH_TOKEN, else the local server's admin key]
    #[arg(long, hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
    /// List live boxes and sessions (with live cpu/memory/pids/disk); --all for ended ones too.
    Ls(LsArgs),
    /// Create a box; prints its id.
    Create(CreateArgs),
    /// Run a command in a box: `berth exec BOX -- CMD ARGS...`; exits with its exit code.
    Exec(ExecArgs),
    /// Copy a file: `berth cp BOX:path local` or `berth cp local BOX:path`.
    Cp {
        /// `BOX:path` (path relative to /workspace) or a local file.
        src: String,
        /// `BOX:path` (path relative to /workspace) or a local file.
        dst: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete boxes (`box-…`) or stop sessions (`ses-…`).
    Rm {
        /// Box ids (`box-…`) and session ids (`ses-…`).
        #[arg(required = true)]
        ids: Vec<String>,
        /// Print the ended objects as a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Start a command agent in a box and print its events until its first result (`-f`:
    /// until the session ends).
    Start(StartArgs),
    /// Print a session's events; `-f` follows until it ends.
    Logs {
        /// Session id (`ses-…`).
        session: String,
        /// Keep printing new events until the session ends.
        #[arg(short, long)]
        follow: bool,
        /// One JSON event per line.
        #[arg(long)]
        json: bool,
        /// Only events with a sequence number greater than this.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Talk to a session: each line you type is a message; events are printed as they come.
    Chat {
        /// Session id (`ses-…`).
        session: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a prompt with the Claude agent in a new ephemeral box; the box ends with the task.
    Run(RunArgs),
    /// API keys (admin).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Token and container cost, summed by session, box, tenant or model.
    Usage {
        /// What each row sums.
        #[arg(long, default_value = "session", value_parser = ["session", "box", "tenant", "model"])]
        by: String,
        /// Window start, inclusive (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        from: Option<String>,
        /// Window end, exclusive (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run the Messages API stand-in (offline model for demos and tests).
    MockModel {
        /// Address to listen on (host:port).
        #[arg(long, default_value = "127.0.0.1:7701")]
        listen: String,
        /// Scenario file (JSON) [default: the built-in demo].
        #[arg(long)]
        scenario: Option<String>,
        /// Pause between streamed chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
    },
    /// berth's own state: `store copy --from sqlite://… --to postgres://…`.
    Store {
        #[command(subcommand)]
        cmd: store_cmd::StoreCmd,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Box bring-up helper (internal).
    #[command(name = "__box-init", hide = true)]
    BoxInit,
}

#[derive(Args)]
struct ServeArgs {
    /// Listen address, host:port [default: 127.0.0.1:7700; $BERTH_LISTEN]
    #[arg(long)]
    listen: Option<String>,
    /// Data directory: store, admin key, box disks [default: $BERTH_DATA_DIR, else
    /// ~/.local/share/berth]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML config file.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Model API URL the gateway forwards to [default: https://api.anthropic.com;
    /// $BERTH_UPSTREAM_URL]
    #[arg(long)]
    upstream_url: Option<String>,
    /// Log format [default: text; $BERTH_LOG_FORMAT]
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Also run the built-in mock model on loopback and use it as the upstream: agents work
    /// offline, no API key needed.
    #[arg(long)]
    mock_model: bool,
}

#[derive(Args, Clone)]
struct LsArgs {
    /// Also list ended boxes and sessions (stopped, destroyed, failed).
    #[arg(long)]
    all: bool,
    /// Only objects in this state (box: creating, running, parking, parked, restoring,
    /// stopped, destroyed, failed; session: starting, running, idle, stopped, failed,
    /// interrupted). Implies --all.
    #[arg(long)]
    state: Option<String>,
    /// Only boxes with this label (KEY=VALUE), and their sessions.
    #[arg(long)]
    label: Option<String>,
    /// Print {"boxes": [...], "sessions": [...]} as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Clone)]
struct CreateArgs {
    /// What happens when the box is idle or its session ends: ephemeral (destroyed with its
    /// session), persistent (stops after the idle timeout), hybrid (parked to the snapshot
    /// store when idle, restored on next use).
    #[arg(long, default_value = "persistent", value_parser = ["ephemeral", "persistent", "hybrid"])]
    lifecycle: String,
    /// CPU limit, in CPUs (fractions allowed) [default: 1]
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory limit, in MiB [default: 1024]
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Disk quota for /workspace, /home/agent and /tmp, in MiB [default: 5120]
    #[arg(long)]
    disk_mib: Option<u64>,
    /// Most processes at once [default: 512]
    #[arg(long)]
    pids: Option<u64>,
    /// Seconds without activity before the box stops (hybrid: parks) [default: the server's,
    /// 900]
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Seconds after which the box stops, busy or not [default: none]
    #[arg(long)]
    max_lifetime: Option<u64>,
    /// KEY=VALUE environment for every process in the box (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// KEY=VALUE label (repeatable); `berth ls --label` filters on it.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Print the box as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
struct ExecArgs {
    /// Box id (`box-…`).
    #[arg(value_name = "BOX")]
    box_id: String,
    /// Seconds before the command is killed.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print {exit_code, signal, timed_out, oom_killed, stdout, stderr} as JSON.
    #[arg(long)]
    json: bool,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
struct StartArgs {
    /// Existing box to run in (`box-…`) [default: a new ephemeral box]
    #[arg(long = "box")]
    box_id: Option<String>,
    /// First message for the agent (a line on its stdin).
    #[arg(long)]
    prompt: Option<String>,
    /// Print the session id and return at once.
    #[arg(long)]
    detach: bool,
    /// Follow the events until the session ends, not only until its first result.
    #[arg(short, long)]
    follow: bool,
    /// Print the session (--detach) or its events as JSON.
    #[arg(long)]
    json: bool,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
struct RunArgs {
    /// Local directory copied into the box's /workspace first.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Local directory the box's /workspace is copied out to when the agent is done.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Model id [default: the agent's default]
    #[arg(long)]
    model: Option<String>,
    /// Most agent turns before it stops.
    #[arg(long)]
    max_turns: Option<u32>,
    /// Print each event and then {session, result, usage} as JSON lines.
    #[arg(long)]
    json: bool,
    /// The task for the agent.
    prompt: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key for a tenant; prints its id and its secret (shown only this once).
    Create {
        /// Tenant the key belongs to (created on first use).
        #[arg(long)]
        tenant: String,
        /// An admin key: sees every tenant and manages keys.
        #[arg(long)]
        admin: bool,
        /// Print the key object (id, tenant, key, …) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List keys (never their secrets).
    Ls {
        /// Print the keys as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a key.
    Rm {
        /// Key id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn main() {
    // The box helper must run before any runtime or thread exists.
    if std::env::args().nth(1).as_deref() == Some("__box-init") {
        berth_sandbox::native::init::run();
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(real_main(cli)) {
        eprintln!("berth: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> Result<()> {
    let client = |c: &Conn| client::from_env(c.url.clone(), c.token.clone());
    match cli.cmd {
        Cmd::Serve(a) => serve(a).await,
        Cmd::BoxInit => unreachable_box_init(),
        Cmd::MockModel {
            listen,
            scenario,
            chunk_delay_ms,
        } => {
            let sc = match scenario {
                Some(p) => berth_mock_model::scenario::Scenario::load(&p)?,
                None => berth_mock_model::scenario::Scenario::demo(),
            };
            let mock =
                berth_mock_model::Mock::new(sc, std::time::Duration::from_millis(chunk_delay_ms));
            let addr = listen
                .parse()
                .with_context(|| format!("--listen {listen}"))?;
            let inspect = mock.inspect_token().to_string();
            berth_mock_model::serve(
                mock,
                addr,
                |a| {
                    println!("mock model listening on http://{a}");
                    println!(
                        "inspect with: curl -H '{}: {inspect}' http://{a}/_mock/requests",
                        berth_mock_model::INSPECT_HEADER
                    );
                },
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
            )
            .await?;
            Ok(())
        }
        Cmd::Openapi => {
            println!("{}", berth_server::api::openapi_json());
            Ok(())
        }
        Cmd::Ls(a) => ls(&client(&a.conn)?, &a).await,
        Cmd::Create(a) => {
            let b = client(&a.conn)?.create_box(&box_spec(&a)?).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!("{}", b.id);
            }
            Ok(())
        }
        Cmd::Exec(a) => {
            let req = ExecRequest {
                argv: a.argv,
                timeout_s: Some(a.timeout),
                ..Default::default()
            };
            let r = client(&a.conn)?.exec(&a.box_id, &req).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.stdout);
                eprint!("{}", r.stderr);
            }
            let code = r.exit_code.unwrap_or(128 + r.signal.unwrap_or(0));
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Cmd::Cp { src, dst, conn } => cp(&client(&conn)?, &src, &dst).await,
        Cmd::Rm { ids, json, conn } => {
            let c = client(&conn)?;
            let mut ended = Vec::new();
            for id in ids {
                let (v, line) = if id.starts_with("ses-") {
                    let s = c.delete_session(&id).await?;
                    let line = format!("{} {}", s.id, s.state.as_str());
                    (serde_json::to_value(s)?, line)
                } else {
                    let b = c.delete_box(&id).await?;
                    let line = format!("{} {}", b.id, b.state.as_str());
                    (serde_json::to_value(b)?, line)
                };
                if json {
                    ended.push(v);
                } else {
                    println!("{line}");
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&ended)?);
            }
            Ok(())
        }
        Cmd::Start(a) => start(&client(&a.conn)?, a).await,
        Cmd::Logs {
            session,
            follow,
            json,
            after,
            conn,
        } => logs(&client(&conn)?, &session, follow, json, after).await,
        Cmd::Chat { session, conn } => chat(&client(&conn)?, &session).await,
        Cmd::Run(a) => run(&client(&a.conn)?, a).await,
        Cmd::Keys { cmd } => keys(cmd, client).await,
        Cmd::Store { cmd } => store_cmd::run(cmd).await,
        Cmd::Usage {
            by,
            from,
            to,
            json,
            conn,
        } => usage(&client(&conn)?, &by, from, to, json).await,
    }
}

fn unreachable_box_init() -> Result<()> {
    bail!("__box-init must be the first argument")
}

async fn serve(a: ServeArgs) -> Result<()> {
    let mut cfg = berth_server::Config::load(a.config.as_deref())?;
    if let Some(l) = a.listen {
        cfg.listen = l.parse().with_context(|| format!("--listen {l}"))?;
    }
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(u) = a.upstream_url {
        cfg.upstream_url = u;
    }
    if let Some(f) = a.log_format {
        cfg.log_format = f;
    }
    init_logging(&cfg.log_format);
    if a.mock_model {
        let mock = berth_mock_model::Mock::new(
            berth_mock_model::scenario::Scenario::demo(),
            std::time::Duration::from_millis(20),
        );
        cfg.upstream_url = berth_mock_model::spawn_loopback(&mock).await?;
        if cfg.anthropic_api_key.is_none() {
            cfg.anthropic_api_key = Some("sk-berth-mock-model".into());
        }
        tracing::info!(upstream = %cfg.upstream_url, "using the built-in mock model");
    }
    let helper = berth_sandbox::native::helper_beside(
        &std::env::current_exe().context("locating the berth executable")?,
    );
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    berth_server::run(
        cfg,
        berth_server::Runtime::new(helper),
        |s| {
            println!(
                "berth listening on http://{} (admin key in {})",
                s.addr,
                s.admin_key_file.display()
            );
        },
        shutdown,
    )
    .await?;
    Ok(())
}

fn init_logging(format: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    // Each layer has its own filter: exported spans do not depend on the log level.
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    #[cfg(feature = "otel")]
    let registry = registry.with(otel::layer());
    registry.init();
}

/// OpenTelemetry export of tracing spans over OTLP/HTTP, when built with `--features otel`
/// and `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard OTLP environment variables apply).
#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    pub fn layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT")?;
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("OpenTelemetry export disabled: {e}");
                return None;
            }
        };
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("berth")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("berth");
        opentelemetry::global::set_tracer_provider(provider);
        let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_OTEL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter),
        )
    }
}

fn key_values(flag: &str, items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for kv in items {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--{flag} {kv}: expected KEY=VALUE"))?;
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

fn box_spec(a: &CreateArgs) -> Result<BoxSpec> {
    let lifecycle = match a.lifecycle.as_str() {
        "ephemeral" => Lifecycle::Ephemeral,
        "persistent" => Lifecycle::Persistent,
        "hybrid" => Lifecycle::Hybrid,
        other => bail!("unknown lifecycle {other:?} (ephemeral, persistent, hybrid)"),
    };
    let mut r = Resources::default();
    if let Some(v) = a.cpus {
        r.cpus = v;
    }
    if let Some(v) = a.memory_mib {
        r.memory_mib = v;
    }
    if let Some(v) = a.disk_mib {
        r.disk_mib = v;
    }
    if let Some(v) = a.pids {
        r.pids = v;
    }
    Ok(BoxSpec {
        lifecycle: Some(lifecycle),
        resources: r,
        env: key_values("env", &a.env)?,
        labels: key_values("label", &a.labels)?,
        // Unset: the server's default for the lifecycle.
        idle_timeout_s: a.idle_timeout.map(Some),
        max_lifetime_s: a.max_lifetime,
        ..Default::default()
    })
}

async fn ls(c: &Client, a: &LsArgs) -> Result<()> {
    let boxes = c.list_boxes().await?;
    let sessions = c.list_sessions().await?;
    if let Some(st) = &a.state {
        if BoxState::parse(st).is_none() && SessionState::parse(st).is_none() {
            bail!("--state {st:?}: not a box state (creating, running, parking, parked, restoring, stopped, destroyed, failed) or session state (starting, running, idle, stopped, failed, interrupted)");
        }
    }
    let label = match &a.label {
        Some(l) => Some(
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--label {l}: expected KEY=VALUE"))?,
        ),
        None => None,
    };
    let boxes: Vec<BoxObject> = boxes
        .items
        .into_iter()
        .filter(|b| match &a.state {
            Some(st) => b.state.as_str() == st,
            None => a.all || !b.state.is_terminal(),
        })
        .filter(|b| {
            label
                .as_ref()
                .is_none_or(|(k, v)| b.labels.get(k) == Some(v))
        })
        .collect();
    let sessions: Vec<SessionObject> = sessions
        .items
        .into_iter()
        .filter(|s| match &a.state {
            Some(st) => s.state.as_str() == st,
            None => a.all || !s.state.is_terminal(),
        })
        // A label selects boxes; their sessions come with them.
        .filter(|s| label.is_none() || boxes.iter().any(|b| b.id == s.box_id))
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"boxes": boxes, "sessions": sessions})
        );
        return Ok(());
    }
    println!(
        "{:<22} {:<10} {:<10} {:<8} {:>5} {:>8} {:>9} {:>9} {:>5} {:>9}  CREATED",
        "BOX",
        "STATE",
        "LIFECYCLE",
        "BACKEND",
        "CPUS",
        "MEM_MIB",
        "CPU_S",
        "MEM_USED",
        "PIDS",
        "DISK_USED"
    );
    for b in &boxes {
        // Live figures from the box's cgroup and quota, for running boxes.
        let stats: Option<BoxStats> = if b.state == BoxState::Running {
            c.box_stats(&b.id).await.ok()
        } else {
            None
        };
        let (cpu, mem, pids, disk) = match &stats {
            Some(st) => (
                format!("{:.2}", st.cpu_usage_ns as f64 / 1e9),
                mib(st.memory_bytes),
                st.pids.to_string(),
                mib(st.disk_used_bytes),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<22} {:<10} {:<10} {:<8} {:>5} {:>8} {:>9} {:>9} {:>5} {:>9}  {}",
            b.id,
            b.state.as_str(),
            format!("{:?}", b.lifecycle).to_lowercase(),
            b.backend,
            b.resources.cpus,
            b.resources.memory_mib,
            cpu,
            mem,
            pids,
            disk,
            b.created_at
        );
    }
    println!();
    println!(
        "{:<22} {:<22} {:<12} {:>6}  CREATED",
        "SESSION", "BOX", "STATE", "EVENTS"
    );
    for s in &sessions {
        println!(
            "{:<22} {:<22} {:<12} {:>6}  {}",
            s.id,
            s.box_id,
            s.state.as_str(),
            s.last_seq,
            s.created_at
        );
    }
    if !a.all && a.state.is_none() {
        eprintln!("(live objects only; --all lists ended ones too)");
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

fn split_box_path(s: &str) -> Option<(&str, &str)> {
    let (b, p) = s.split_once(':')?;
    (b.starts_with("box-")).then_some((
        b,
        p.trim_start_matches("/workspace/").trim_start_matches('/'),
    ))
}

async fn cp(c: &Client, src: &str, dst: &str) -> Result<()> {
    match (split_box_path(src), split_box_path(dst)) {
        (Some((b, p)), None) => {
            let f = c.get_file(b, p).await?;
            if f.is_json {
                bail!("{src} is a directory; copy files one at a time");
            }
            std::fs::write(dst, f.bytes).with_context(|| format!("writing {dst}"))?;
        }
        (None, Some((b, p))) => {
            let data = std::fs::read(src).with_context(|| format!("reading {src}"))?;
            c.put_file(b, p, data).await?;
        }
        _ => bail!("exactly one of SRC and DST must be BOX:path"),
    }
    Ok(())
}

async fn start(c: &Client, a: StartArgs) -> Result<()> {
    let spec = SessionSpec {
        box_ref: match a.box_id {
            Some(id) => BoxRef::Id(id),
            None => BoxRef::Spec(Box::new(BoxSpec {
                lifecycle: Some(Lifecycle::Ephemeral),
                ..Default::default()
            })),
        },
        agent: AgentSpec::Command(CommandAgent {
            argv: a.argv,
            unknown: Default::default(),
        }),
        workdir: None,
        prompt: a.prompt,
        keep_open: false,
    };
    let s = c.create_session(&spec).await?;
    if a.detach {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            println!("{}", s.id);
        }
        return Ok(());
    }
    eprintln!("session {} in box {}", s.id, s.box_id);
    if a.follow {
        return logs(c, &s.id, true, a.json, 0).await;
    }
    // Until the agent's first result and the status it leads to (idle, stopped, failed), or
    // the session's end.
    let mut r = render::Renderer::new(a.json, true);
    let mut ended = false;
    let mut result = false;
    let mut failed = None;
    client::follow(c, &s.id, 0, |e| {
        r.event(&e);
        if e.kind == "result" {
            result = true;
        }
        if e.kind == "status" {
            let st = e.data["state"].as_str().and_then(SessionState::parse);
            ended = st.is_some_and(|st| st.is_terminal());
            if st == Some(SessionState::Failed) {
                failed = Some(e.data["reason"].as_str().unwrap_or("").to_string());
            }
            if ended || (result && st.is_some()) {
                return false;
            }
        }
        true
    })
    .await?;
    r.finish();
    if let Some(why) = failed {
        bail!("session {} failed: {why}", s.id);
    }
    if !ended && !a.json {
        let now = c.get_session(&s.id).await?;
        if !now.state.is_terminal() {
            eprintln!(
                "session {} is {}: `berth logs {} -f` to follow, `berth rm {}` to end it",
                s.id,
                now.state.as_str(),
                s.id,
                s.id
            );
        }
    }
    Ok(())
}

async fn logs(c: &Client, session: &str, follow: bool, json: bool, after: i64) -> Result<()> {
    let mut r = render::Renderer::new(json, follow);
    if follow {
        client::follow(c, session, after, |e| {
            r.event(&e);
            true
        })
        .await?;
    } else {
        let mut last = after;
        loop {
            let mut got = 0;
            let s = c.get_session(session).await?;
            if last >= s.last_seq {
                break;
            }
            client::follow(c, session, last, |e| {
                got += 1;
                last = e.seq;
                r.event(&e);
                e.seq < s.last_seq
            })
            .await?;
            if got == 0 {
                break;
            }
        }
    }
    r.finish();
    Ok(())
}

async fn chat(c: &Client, session: &str) -> Result<()> {
    let s = c.get_session(session).await?;
    if s.state.is_terminal() {
        bail!("session {session} has ended ({})", s.state.as_str());
    }
    let follower = {
        let c = c.clone();
        let id = session.to_string();
        tokio::spawn(async move {
            let mut r = render::Renderer::new(false, false);
            let _ = client::follow(&c, &id, s.last_seq, |e| {
                r.event(&e);
                true
            })
            .await;
        })
    };
    let cost = live_cost(c.clone(), session.to_string());
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    use tokio::io::AsyncBufReadExt;
    let mut lines = stdin.lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        c.send_message(
            session,
            &MessageRequest {
                content: serde_json::Value::String(line),
            },
        )
        .await?;
    }
    follower.abort();
    cost.abort();
    Ok(())
}

/// Print the session's metered cost to stderr whenever it changes (polled every 2 s) until
/// aborted.
fn live_cost(c: Client, id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shown = 0.0;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let Ok(u) = c.session_usage(&id).await else {
                continue;
            };
            if (u.total_usd - shown).abs() >= 0.00005 {
                shown = u.total_usd;
                eprintln!(
                    "[cost so far: ${:.4} (model ${:.4} + box ${:.4}), metered by berth]",
                    u.total_usd, u.total.cost_usd, u.container_usd
                );
            }
        }
    })
}

async fn run(c: &Client, a: RunArgs) -> Result<()> {
    // The box first, so that `--dir` is in it before the agent starts; ephemeral, so that it
    // ends with the session (at the agent's first result), leaving its workspace as an
    // artifact when `--out` asks for it.
    let b = c
        .create_box(&BoxSpec {
            lifecycle: Some(Lifecycle::Ephemeral),
            keep_workspace: a.out.is_some(),
            ..Default::default()
        })
        .await?;
    let started = async {
        if let Some(dir) = &a.dir {
            let (files, bytes) = upload_dir(c, &b.id, dir).await?;
            if !a.json {
                eprintln!(
                    "copied {files} files ({bytes} bytes) from {} into /workspace",
                    dir.display()
                );
            }
        }
        let spec = SessionSpec {
            box_ref: BoxRef::Id(b.id.clone()),
            agent: AgentSpec::Claude(ClaudeAgent {
                model: a.model.clone(),
                max_turns: a.max_turns,
                ..Default::default()
            }),
            workdir: None,
            prompt: Some(a.prompt.clone()),
            keep_open: false,
        };
        Ok::<_, anyhow::Error>(c.create_session(&spec).await?)
    }
    .await;
    let s = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = c.delete_box(&b.id).await;
            return Err(e);
        }
    };
    let cost = (!a.json).then(|| live_cost(c.clone(), s.id.clone()));
    let mut r = render::Renderer::new(a.json, true);
    let mut result: Option<serde_json::Value> = None;
    let mut ended: Option<(String, String)> = None;
    // The server ends the session at its result; one that does not (a server from before
    // that rule) is given a moment, then ended below.
    let answered = std::sync::Arc::new(tokio::sync::Notify::new());
    let grace = {
        let answered = answered.clone();
        async move {
            answered.notified().await;
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
    };
    let follow = client::follow(c, &s.id, 0, |e| {
        r.event(&e);
        if e.kind == "result" && result.is_none() {
            result = Some(e.data.clone());
            answered.notify_one();
        }
        if e.kind == "status" {
            let st = e.data["state"].as_str().unwrap_or("");
            if matches!(st, "stopped" | "failed") {
                ended = Some((
                    st.to_string(),
                    e.data["reason"].as_str().unwrap_or("").to_string(),
                ));
                return false;
            }
        }
        true
    });
    let followed = tokio::select! {
        f = follow => f,
        _ = grace => Ok(0),
    };
    r.finish();
    if let Some(cost) = cost {
        cost.abort();
    }
    if followed.is_err() || ended.is_none() {
        // Interrupted: do not leave the session (and its box) running.
        let _ = c.delete_session(&s.id).await;
        followed?;
    }
    if let Some(out) = &a.out {
        let (files, bytes) = fetch_artifact(c, &b.id, out).await?;
        if !a.json {
            eprintln!(
                "copied {files} files ({bytes} bytes) from /workspace to {}",
                out.display()
            );
        }
    }
    let usage = c.session_usage(&s.id).await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"session": s.id, "box": b.id, "result": result, "usage": usage})
        );
    } else {
        if let Some(r) = &result {
            println!("\n{}", r["result"].as_str().unwrap_or(""));
            eprintln!(
                "turns: {}  tokens: {} in / {} out  cost metered by berth: ${:.4} model + ${:.4} box = ${:.4} (agent-reported: ${:.4}{})",
                r["num_turns"],
                usage.total.input_tokens,
                usage.total.output_tokens,
                usage.total.cost_usd,
                usage.container_usd,
                usage.total_usd,
                r["total_cost_usd"].as_f64().unwrap_or(0.0),
                if usage.cost_gap { "; the two differ: check the price table" } else { "" }
            );
        }
    }
    match (&ended, &result) {
        (Some((st, reason)), _) if st == "failed" => bail!("the agent failed: {reason}"),
        (_, Some(r)) if r["is_error"] == true => {
            bail!("the agent stopped with {}", r["subtype"])
        }
        (_, None) => bail!(
            "the agent ended without a result: {}",
            ended.map(|(_, r)| r).unwrap_or_default()
        ),
        _ => {
            if !a.json {
                eprintln!("done");
            }
            Ok(())
        }
    }
}

/// Unpack the workspace archive an ended `keep_workspace` box left into `dest`; returns the
/// files and bytes written. Only plain files and directories inside `dest` are written.
async fn fetch_artifact(c: &Client, box_id: &str, dest: &std::path::Path) -> Result<(u64, u64)> {
    // The box is destroyed (and its archive stored) just after the session ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let b = c.get_box(box_id).await?;
        if b.artifact.is_some() {
            break;
        }
        if b.state.is_terminal() {
            bail!(
                "box {box_id} ended without a workspace archive ({}); `berth ls --all` and GET /v1/boxes/{box_id}/events say why",
                b.state_reason.unwrap_or_default()
            );
        }
        if std::time::Instant::now() > deadline {
            bail!("box {box_id} did not end within 120 s; its workspace was not copied");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let tar = c.artifact(box_id).await?;
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut archive = tar::Archive::new(&tar[..]);
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        // Entries are `workspace/…`; anything else, or anything leaving it, is skipped.
        let Ok(rel) = path.strip_prefix("workspace") else {
            continue;
        };
        if rel.as_os_str().is_empty()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            continue;
        }
        let target = dest.join(rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(&target)?,
            tar::EntryType::Regular => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let mut f = std::fs::File::create(&target)
                    .with_context(|| format!("writing {}", target.display()))?;
                bytes += std::io::copy(&mut entry, &mut f)?;
                files += 1;
            }
            _ => {}
        }
    }
    Ok((files, bytes))
}

/// Copy `dir` into the box's workspace; returns the files and bytes copied.
async fn upload_dir(c: &Client, box_id: &str, dir: &std::path::Path) -> Result<(u64, u64)> {
    let mut stack = vec![dir.to_path_buf()];
    let (mut files, mut bytes) = (0u64, 0u64);
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(dir)?.to_string_lossy().into_owned();
                let data = std::fs::read(&p)?;
                bytes += data.len() as u64;
                files += 1;
                c.put_file(box_id, &rel, data).await?;
            }
        }
    }
    Ok((files, bytes))
}

/// The usage report as a table: tokens and model cost metered by the gateway, container time.
async fn usage(
    c: &Client,
    by: &str,
    from: Option<String>,
    to: Option<String>,
    json: bool,
) -> Result<()> {
    let mut q = vec![("group_by", by)];
    for (k, v) in [("from", &from), ("to", &to)] {
        if let Some(v) = v {
            q.push((k, v.as_str()));
        }
    }
    let r = c.usage(&q).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>6} {:>10} {:>9} {:>11} {:>10} {:>10} {:>9} {:>9} {:>9}",
        by.to_uppercase(),
        "REQS",
        "INPUT",
        "OUTPUT",
        "CACHE_WRITE",
        "CACHE_READ",
        "MODEL_USD",
        "BOX_HOURS",
        "BOX_USD",
        "TOTAL_USD"
    );
    let row = |key: &str, u: &UsageTotals| {
        println!(
            "{:<24} {:>6} {:>10} {:>9} {:>11} {:>10} {:>10.4} {:>9.3} {:>9.4} {:>9.4}",
            key,
            u.requests,
            u.input_tokens,
            u.output_tokens,
            u.cache_creation_5m_tokens + u.cache_creation_1h_tokens,
            u.cache_read_tokens,
            u.model_usd,
            u.container_hours,
            u.container_usd,
            u.total_usd
        )
    };
    for g in &r.groups {
        row(&g.key, &g.usage);
    }
    // By session or model, box time belongs to no row (a box serves several sessions and
    // models): show it as a row of its own, so that the rows add up to the total.
    let hours: f64 = r.groups.iter().map(|g| g.usage.container_hours).sum();
    let usd: f64 = r.groups.iter().map(|g| g.usage.container_usd).sum();
    if r.total.container_hours - hours > 1e-9 || r.total.container_usd - usd > 1e-9 {
        let box_time = UsageTotals {
            container_hours: r.total.container_hours - hours,
            container_usd: r.total.container_usd - usd,
            total_usd: r.total.container_usd - usd,
            ..Default::default()
        };
        row("(box time)", &box_time);
    }
    row("TOTAL", &r.total);
    Ok(())
}

async fn keys(cmd: KeysCmd, client: impl Fn(&Conn) -> Result<Client>) -> Result<()> {
    match cmd {
        KeysCmd::Create {
            tenant,
            admin,
            json,
            conn,
        } => {
            let k = client(&conn)?
                .create_key(&KeyCreate { tenant, admin })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&k)?);
            } else {
                println!("id:     {}", k.id);
                println!(
                    "tenant: {}{}",
                    k.tenant,
                    if k.admin { " (admin)" } else { "" }
                );
                println!("key:    {}", k.key.as_deref().unwrap_or(""));
                eprintln!(
                    "The key is shown only this once: store it now (use it as BERTH_TOKEN). `berth keys rm {}` revokes it.",
                    k.id
                );
            }
        }
        KeysCmd::Ls { json, conn } => {
            let l = client(&conn)?.list_keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l.items)?);
                return Ok(());
            }
            println!("{:<22} {:<16} {:<6} CREATED", "ID", "TENANT", "ADMIN");
            for k in l.items {
                println!(
                    "{:<22} {:<16} {:<6} {}",
                    k.id,
                    k.tenant,
                    if k.admin { "yes" } else { "no" },
                    k.created_at
                );
            }
        }
        KeysCmd::Rm { id, conn } => {
            client(&conn)?.delete_key(&id).await?;
            println!("{id} revoked");
        }
    }
    Ok(())
}
