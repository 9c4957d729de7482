//! `berth`: the server, the CLI client and the model stand-in in one binary.

mod client;
mod render;

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
    about = "Run AI agents in isolated sandboxes on your own machines"
)]
struct Cli {
    /// Server URL (default: $BERTH_URL, else the local server).
    #[arg(long, global = true)]
    url: Option<String>,
    /// API key (default: $BERTH_TOKEN, else the local server's admin key).
    #[arg(long, global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
    /// List boxes and sessions.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Create a box.
    Create(CreateArgs),
    /// Run a command in a box: `berth exec BOX -- CMD ARGS...`.
    Exec {
        #[arg(value_name = "BOX")]
        box_id: String,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long)]
        json: bool,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Copy a file: `berth cp BOX:path local` or `berth cp local BOX:path`.
    Cp { src: String, dst: String },
    /// Delete boxes (`box-…`) or stop sessions (`ses-…`).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Start a session running a command agent and print its events.
    Start(StartArgs),
    /// Print a session's events; `-f` follows until it ends.
    Logs {
        session: String,
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Talk to a session: each line you type is a message; events are printed as they come.
    Chat { session: String },
    /// Run a prompt in a new ephemeral box with the Claude agent.
    Run(RunArgs),
    /// API keys (admin).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Token and container cost, summed by session, box, tenant or model.
    Usage {
        /// session | box | tenant | model
        #[arg(long, default_value = "session")]
        by: String,
        /// Window start (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        from: Option<String>,
        /// Window end (RFC 3339, exclusive).
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run the Messages API stand-in (offline model for demos and tests).
    MockModel {
        #[arg(long, default_value = "127.0.0.1:7701")]
        listen: String,
        /// Scenario file (JSON); default: the built-in demo.
        #[arg(long)]
        scenario: Option<String>,
        /// Pause between streamed chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Box bring-up helper (internal).
    #[command(name = "__box-init", hide = true)]
    BoxInit,
}

#[derive(Args)]
struct ServeArgs {
    /// Listen address (default 127.0.0.1:7700; $BERTH_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory ($BERTH_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML config file ($BERTH_CONFIG).
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Model API the gateway forwards to ($BERTH_UPSTREAM_URL).
    #[arg(long)]
    upstream_url: Option<String>,
    /// Log format: text or json ($BERTH_LOG_FORMAT).
    #[arg(long)]
    log_format: Option<String>,
    /// Also run the built-in mock model on loopback and use it as the upstream: agents work
    /// offline, no API key needed.
    #[arg(long)]
    mock_model: bool,
}

#[derive(Args, Clone)]
struct CreateArgs {
    #[arg(long, default_value = "persistent")]
    lifecycle: String,
    #[arg(long)]
    cpus: Option<f64>,
    #[arg(long)]
    memory_mib: Option<u64>,
    #[arg(long)]
    disk_mib: Option<u64>,
    #[arg(long)]
    pids: Option<u64>,
    #[arg(long)]
    idle_timeout: Option<u64>,
    #[arg(long)]
    max_lifetime: Option<u64>,
    /// KEY=VALUE environment for every process in the box.
    #[arg(long = "env")]
    env: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StartArgs {
    /// Existing box to run in (default: a new ephemeral box).
    #[arg(long = "box")]
    box_id: Option<String>,
    /// First message for the agent.
    #[arg(long)]
    prompt: Option<String>,
    /// Return at once instead of following the events.
    #[arg(long)]
    detach: bool,
    #[arg(long)]
    json: bool,
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    /// Directory copied into the box's workspace first.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Directory the workspace is copied out to when the agent is done.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    max_turns: Option<u32>,
    #[arg(long)]
    json: bool,
    prompt: String,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key for a tenant.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        admin: bool,
    },
    /// List keys.
    Ls,
    /// Revoke a key.
    Rm { id: String },
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
    let client = || Client::from_env(cli.url.clone(), cli.token.clone());
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
        Cmd::Ls { json } => ls(&client()?, json).await,
        Cmd::Create(a) => {
            let b: BoxObject = client()?.post("/v1/boxes", &box_spec(&a)?).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!("{}", b.id);
            }
            Ok(())
        }
        Cmd::Exec {
            box_id,
            timeout,
            json,
            argv,
        } => {
            let req = ExecRequest {
                argv,
                timeout_s: Some(timeout),
                ..Default::default()
            };
            let r: ExecResponse = client()?
                .post(&format!("/v1/boxes/{box_id}/exec"), &req)
                .await?;
            if json {
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
        Cmd::Cp { src, dst } => cp(&client()?, &src, &dst).await,
        Cmd::Rm { ids } => {
            let c = client()?;
            for id in ids {
                if id.starts_with("ses-") {
                    let s: SessionObject = c.delete(&format!("/v1/sessions/{id}")).await?;
                    println!("{} {}", s.id, s.state.as_str());
                } else {
                    let b: BoxObject = c.delete(&format!("/v1/boxes/{id}")).await?;
                    println!("{} {}", b.id, b.state.as_str());
                }
            }
            Ok(())
        }
        Cmd::Start(a) => start(&client()?, a).await,
        Cmd::Logs {
            session,
            follow,
            json,
            after,
        } => logs(&client()?, &session, follow, json, after).await,
        Cmd::Chat { session } => chat(&client()?, &session).await,
        Cmd::Run(a) => run(&client()?, a).await,
        Cmd::Keys { cmd } => keys(&client()?, cmd).await,
        Cmd::Usage { by, from, to, json } => usage(&client()?, &by, from, to, json).await,
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
    let mut env = BTreeMap::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv}: expected KEY=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    Ok(BoxSpec {
        lifecycle,
        resources: r,
        env,
        idle_timeout_s: a.idle_timeout,
        max_lifetime_s: a.max_lifetime,
        ..Default::default()
    })
}

async fn ls(c: &Client, json: bool) -> Result<()> {
    let boxes: List<BoxObject> = c.get("/v1/boxes").await?;
    let sessions: List<SessionObject> = c.get("/v1/sessions").await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"boxes": boxes.items, "sessions": sessions.items})
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
    for b in &boxes.items {
        // Live figures from the box's cgroup and quota, for running boxes.
        let stats: Option<BoxStats> = if b.state == BoxState::Running {
            c.get(&format!("/v1/boxes/{}/stats", b.id)).await.ok()
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
    for s in &sessions.items {
        println!(
            "{:<22} {:<22} {:<12} {:>6}  {}",
            s.id,
            s.box_id,
            s.state.as_str(),
            s.last_seq,
            s.created_at
        );
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
            let (bytes, is_dir) = c.get_bytes(&format!("/v1/boxes/{b}/files/{p}")).await?;
            if is_dir {
                bail!("{src} is a directory; copy files one at a time");
            }
            std::fs::write(dst, bytes).with_context(|| format!("writing {dst}"))?;
        }
        (None, Some((b, p))) => {
            let data = std::fs::read(src).with_context(|| format!("reading {src}"))?;
            c.put_bytes(&format!("/v1/boxes/{b}/files/{p}"), data)
                .await?;
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
                lifecycle: Lifecycle::Ephemeral,
                ..Default::default()
            })),
        },
        agent: AgentSpec::Command(CommandAgent {
            argv: a.argv,
            unknown: Default::default(),
        }),
        workdir: None,
        prompt: a.prompt,
    };
    let s: SessionObject = c.post("/v1/sessions", &spec).await?;
    if a.detach {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            println!("{}", s.id);
        }
        return Ok(());
    }
    eprintln!("session {} in box {}", s.id, s.box_id);
    logs(c, &s.id, true, a.json, 0).await
}

async fn logs(c: &Client, session: &str, follow: bool, json: bool, after: i64) -> Result<()> {
    let mut r = render::Renderer::new(json, follow);
    if follow {
        c.follow(session, after, |e| {
            r.event(&e);
            true
        })
        .await?;
    } else {
        let mut last = after;
        loop {
            let mut got = 0;
            let s: SessionObject = c.get(&format!("/v1/sessions/{session}")).await?;
            if last >= s.last_seq {
                break;
            }
            c.follow(session, last, |e| {
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
    let s: SessionObject = c.get(&format!("/v1/sessions/{session}")).await?;
    if s.state.is_terminal() {
        bail!("session {session} has ended ({})", s.state.as_str());
    }
    let follower = {
        let c = c.clone();
        let id = session.to_string();
        tokio::spawn(async move {
            let mut r = render::Renderer::new(false, false);
            let _ = c
                .follow(&id, s.last_seq, |e| {
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
        let _: Accepted = c
            .post(
                &format!("/v1/sessions/{session}/messages"),
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
            let Ok(u) = c
                .get::<SessionUsage>(&format!("/v1/sessions/{id}/usage"))
                .await
            else {
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
    let spec = SessionSpec {
        box_ref: BoxRef::Spec(Box::new(BoxSpec {
            lifecycle: Lifecycle::Ephemeral,
            ..Default::default()
        })),
        agent: AgentSpec::Claude(ClaudeAgent {
            model: a.model,
            max_turns: a.max_turns,
            ..Default::default()
        }),
        workdir: None,
        prompt: None,
    };
    let s: SessionObject = c.post("/v1/sessions", &spec).await?;
    let result = async {
        if let Some(dir) = &a.dir {
            upload_dir(c, &s.box_id, dir).await?;
        }
        let _: Accepted = c
            .post(
                &format!("/v1/sessions/{}/messages", s.id),
                &MessageRequest {
                    content: serde_json::Value::String(a.prompt.clone()),
                },
            )
            .await?;
        let cost = (!a.json).then(|| live_cost(c.clone(), s.id.clone()));
        let mut r = render::Renderer::new(a.json, true);
        let mut result: Option<serde_json::Value> = None;
        let mut failed: Option<String> = None;
        c.follow(&s.id, 0, |e| {
            r.event(&e);
            match e.kind.as_str() {
                "result" => {
                    result = Some(e.data.clone());
                    false
                }
                "status"
                    if matches!(e.data["state"].as_str(), Some("failed") | Some("stopped")) =>
                {
                    failed = Some(
                        e.data["reason"]
                            .as_str()
                            .unwrap_or("the agent ended")
                            .to_string(),
                    );
                    false
                }
                _ => true,
            }
        })
        .await?;
        r.finish();
        if let Some(cost) = cost {
            cost.abort();
        }
        if let Some(out) = &a.out {
            download_dir(c, &s.box_id, "", out).await?;
        }
        let usage: SessionUsage = c.get(&format!("/v1/sessions/{}/usage", s.id)).await?;
        Ok::<_, anyhow::Error>((result, failed, usage))
    }
    .await;
    // The box is ephemeral: ending the session removes it.
    let _ = c
        .delete::<SessionObject>(&format!("/v1/sessions/{}", s.id))
        .await;
    let (result, failed, usage) = result?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"session": s.id, "result": result, "usage": usage})
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
    if let Some(f) = failed {
        bail!("the agent failed: {f}");
    }
    if result.as_ref().is_some_and(|r| r["is_error"] == true) {
        bail!(
            "the agent stopped with {}",
            result
                .as_ref()
                .map(|r| r["subtype"].to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Copy the box's workspace (from `rel`) into `dest`.
async fn download_dir(c: &Client, box_id: &str, rel: &str, dest: &std::path::Path) -> Result<()> {
    let listing: DirListing = c.get(&format!("/v1/boxes/{box_id}/files/{rel}")).await?;
    std::fs::create_dir_all(dest)?;
    for e in listing.entries {
        let sub = if rel.is_empty() {
            e.name.clone()
        } else {
            format!("{rel}/{}", e.name)
        };
        match e.kind.as_str() {
            "dir" => Box::pin(download_dir(c, box_id, &sub, &dest.join(&e.name))).await?,
            "file" => {
                let (bytes, _) = c
                    .get_bytes(&format!("/v1/boxes/{box_id}/files/{sub}"))
                    .await?;
                std::fs::write(dest.join(&e.name), bytes)?;
            }
            _ => {}
        }
    }
    Ok(())
}

async fn upload_dir(c: &Client, box_id: &str, dir: &std::path::Path) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(dir)?.to_string_lossy().into_owned();
                c.put_bytes(
                    &format!("/v1/boxes/{box_id}/files/{rel}"),
                    std::fs::read(&p)?,
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// The usage report as a table: tokens and model cost metered by the gateway, container time.
async fn usage(
    c: &Client,
    by: &str,
    from: Option<String>,
    to: Option<String>,
    json: bool,
) -> Result<()> {
    let mut q = vec![format!("group_by={by}")];
    for (k, v) in [("from", from), ("to", to)] {
        if let Some(v) = v {
            q.push(format!("{k}={}", urlencode(&v)));
        }
    }
    let r: UsageReport = c.get(&format!("/v1/usage?{}", q.join("&"))).await?;
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
    row("TOTAL", &r.total);
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn keys(c: &Client, cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Create { tenant, admin } => {
            let k: KeyObject = c.post("/v1/keys", &KeyCreate { tenant, admin }).await?;
            println!("{}", k.key.unwrap_or_default());
        }
        KeysCmd::Ls => {
            let l: List<KeyObject> = c.get("/v1/keys").await?;
            for k in l.items {
                println!(
                    "{:<22} {:<16} {:<6} {}",
                    k.id,
                    k.tenant,
                    if k.admin { "admin" } else { "" },
                    k.created_at
                );
            }
        }
        KeysCmd::Rm { id } => {
            c.send(c.request(reqwest::Method::DELETE, &format!("/v1/keys/{id}")))
                .await?;
        }
    }
    Ok(())
}
