//! The berth control plane as a library: [`start`] opens the store, probes the sandbox
//! backends, reconciles what a previous run left, and serves the API until shutdown.

pub mod anthropic;
pub mod api;
pub mod auth;
pub mod claude_cli;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod listener;
pub mod observe;

use berth_api::KeyObject;
use berth_sandbox::native::{NativeBackend, NativeConfig};
use berth_sandbox::{Backend, Sandbox};
use berth_store::Store;
pub use config::Config;
use engine::{Engine, EngineConfig};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub metrics: PrometheusHandle,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("store: {0}")]
    Store(#[from] berth_store::StoreError),
    #[error("backend {0}: {1}")]
    Backend(String, berth_sandbox::SandboxError),
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("{0}")]
    Engine(#[from] engine::error::EngineError),
    #[error("{0}")]
    Other(String),
}

/// Options the embedding binary decides (not part of the user's config file).
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Executable that runs box bring-up as `<helper> __box-init` (the berth binary itself).
    pub helper: PathBuf,
    /// The ledger's clock (the system clock but in tests).
    pub clock: clock::Clock,
}

impl Runtime {
    pub fn new(helper: PathBuf) -> Runtime {
        Runtime {
            helper,
            clock: clock::Clock::System,
        }
    }
}

pub struct Started {
    pub addr: SocketAddr,
    pub admin_key_file: PathBuf,
    pub state: AppState,
}

pub const ADMIN_KEY_FILE: &str = "admin.key";

async fn bootstrap_admin(store: &dyn Store, cfg: &Config) -> Result<PathBuf, ServerError> {
    let file = cfg.data_dir.join(ADMIN_KEY_FILE);
    if store.count_keys().await? > 0 {
        return Ok(file);
    }
    let key = cfg.admin_key.clone().unwrap_or_else(auth::new_key);
    let obj = KeyObject {
        id: auth::new_id("key"),
        key: None,
        tenant: "default".into(),
        admin: true,
        created_at: auth::now(),
    };
    store.insert_key(&obj, &auth::hash_key(&key)).await?;
    std::fs::write(&file, format!("{key}\n")).map_err(|e| ServerError::DataDir(file.clone(), e))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ServerError::DataDir(file.clone(), e))?;
    tracing::info!(file = %file.display(), "created the admin key");
    Ok(file)
}

/// Bring the server up and serve until `shutdown` resolves; `on_ready` is called once the
/// listener is bound.
pub async fn run(
    cfg: Config,
    rt: Runtime,
    on_ready: impl FnOnce(&Started),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| ServerError::DataDir(cfg.data_dir.clone(), e))?;
    let _ = std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700));
    let durability = match cfg.durability {
        config::Durability::Crash => berth_store::Durability::Crash,
        config::Durability::Power => berth_store::Durability::PowerLoss,
    };
    let store = berth_store::open(
        cfg.database_url.as_deref(),
        &cfg.data_dir.join("berth.db"),
        durability,
    )
    .await?;
    let admin_key_file = bootstrap_admin(&*store, &cfg).await?;

    let mut backends: HashMap<String, Arc<Backend>> = HashMap::new();
    match NativeBackend::new(NativeConfig {
        data_dir: cfg.data_dir.clone(),
        helper: rt.helper.clone(),
        pool_size: cfg.native.disk_pool,
        disks: cfg.native.disks,
    }) {
        Ok(b) => {
            backends.insert("native".into(), Arc::new(Backend::Native(b)));
        }
        Err(e) => {
            if cfg.default_backend == config::BackendName::Native {
                return Err(ServerError::Backend("native".into(), e));
            }
            tracing::warn!(error = %e, "native backend disabled");
        }
    }
    let mut engine_backends = Vec::new();
    if cfg.docker.enabled {
        engine_backends.push(("docker", "runc".to_string()));
    }
    if cfg.docker.gvisor {
        let runtime = cfg.docker.gvisor_runtime.clone();
        engine_backends.push(("gvisor", runtime.unwrap_or_else(|| "runsc".into())));
    }
    for (name, runtime) in engine_backends {
        match berth_sandbox::docker::DockerBackend::new(berth_sandbox::docker::DockerConfig {
            name: name.into(),
            runtime,
            data_dir: cfg.data_dir.clone(),
            helper: rt.helper.clone(),
            socket: cfg.docker.socket.clone(),
        })
        .await
        {
            Ok(b) => {
                backends.insert(name.into(), Arc::new(Backend::Docker(b)));
            }
            Err(e) => {
                if cfg.default_backend.as_str() == name {
                    return Err(ServerError::Backend(name.into(), e));
                }
                tracing::warn!(backend = name, error = %e, "backend disabled");
            }
        }
    }
    if !backends.contains_key(cfg.default_backend.as_str()) {
        return Err(ServerError::Other(format!(
            "default backend {:?} is not available",
            cfg.default_backend.as_str()
        )));
    }
    for (name, b) in &backends {
        tracing::info!(backend = %name, capabilities = ?b.capabilities(), "sandbox backend enabled");
    }

    let claude = match claude_cli::discover(cfg.claude_cli.as_deref()) {
        Ok(c) => {
            tracing::info!(path = %c.path.display(), version = %c.version, "Claude Code CLI");
            Some(c)
        }
        Err(e) => {
            tracing::warn!("claude agents disabled: {e}");
            None
        }
    };
    let (gateway, metered) = berth_gateway::Gateway::new(berth_gateway::GatewayConfig {
        upstream: cfg.upstream_url.clone(),
        api_key: cfg.anthropic_api_key.clone(),
        prices: berth_gateway::price::PriceTable::with_overrides(
            cfg.cost
                .prices
                .iter()
                .map(|p| {
                    (
                        p.model.clone(),
                        berth_gateway::price::Price {
                            input: p.input,
                            output: p.output,
                        },
                    )
                })
                .collect(),
        ),
        warn_fraction: cfg.cost.budget_warn_fraction,
        meter: true,
        box_connections: box_connections(&cfg.box_sockets),
        bearer: cfg.upstream_auth == config::UpstreamAuth::Bearer,
    })
    .map_err(|e| ServerError::Other(e.to_string()))?;
    let mut overrides = HashMap::new();
    for (name, addr) in &cfg.egress.overrides {
        let a: SocketAddr = addr
            .parse()
            .map_err(|e| ServerError::Other(format!("egress override {name} = {addr:?}: {e}")))?;
        overrides.insert(name.to_ascii_lowercase(), a);
    }
    let mut extra_roots_pem = Vec::new();
    for f in &cfg.egress.ca_files {
        extra_roots_pem.push(
            std::fs::read_to_string(f)
                .map_err(|e| ServerError::Other(format!("egress CA {}: {e}", f.display())))?,
        );
    }
    let (egress, mut decisions) =
        berth_gateway::egress::Egress::new(berth_gateway::egress::EgressConfig {
            overrides,
            extra_roots_pem,
            connections: box_connections(&cfg.box_sockets),
            ..Default::default()
        })
        .map_err(|e| ServerError::Other(e.to_string()))?;
    let engine = Engine::new(
        store.clone(),
        backends,
        EngineConfig {
            default_backend: cfg.default_backend.to_string(),
            session_rpm: cfg.session_rpm,
            max_boxes_per_tenant: cfg.max_boxes_per_tenant,
            max_exec_output: cfg.max_exec_output_bytes,
            hook_rate_per_minute: cfg.hook_rate_per_minute,
            idle_timeout: cfg.idle_timeout.clone(),
            max_box: {
                let host = engine::admission::host_max_box();
                engine::admission::MaxBox {
                    cpus: cfg.max_box.cpus.unwrap_or(host.cpus),
                    memory_mib: cfg.max_box.memory_mib.unwrap_or(host.memory_mib),
                    disk_mib: cfg.max_box.disk_mib.unwrap_or(host.disk_mib),
                    pids: cfg.max_box.pids.unwrap_or(host.pids),
                }
            },
            start_boost: cfg.start_boost.spec(),
            events: engine::event_cap::Limits {
                per_second: cfg.events.per_second,
                burst: cfg.events.burst,
                max_bytes: cfg.events.max_bytes,
                max_per_session: cfg.events.max_per_session,
            },
            tenant_totals: engine::admission::TenantTotals {
                cpus: cfg.tenant_max.cpus,
                memory_mib: cfg.tenant_max.memory_mib,
                disk_mib: cfg.tenant_max.disk_mib,
            },
            cost: engine::ledger::CostConfig {
                box_hour_usd: cfg.cost.box_hour_usd,
                scale_by_resources: cfg.cost.box_hour_scale == config::BoxHourScale::Resources,
                gap_fraction: cfg.cost.gap_fraction,
            },
            clock: rt.clock.clone(),
            snapshots: match &cfg.snapshot_url {
                Some(url) => berth_store::snapshots::SnapshotStore::from_url(url),
                None => berth_store::snapshots::SnapshotStore::local(
                    &cfg.snapshot_dir
                        .clone()
                        .unwrap_or_else(|| cfg.data_dir.join("snapshots")),
                ),
            }
            .map_err(|e| ServerError::Other(format!("snapshot store: {e}")))?,
        },
        gateway,
        egress,
        claude,
    );
    // Egress decisions are guest-triggered: counted always, logged at debug level only, and
    // recorded (rate-limited) in the box's own event log by its owner task.
    let decisions_engine = engine.clone();
    tokio::spawn(async move {
        while let Some(d) = decisions.recv().await {
            let verdict = if d.allowed { "allowed" } else { "denied" };
            metrics::counter!("berth_egress_requests_total", "verdict" => verdict).increment(1);
            metrics::counter!("berth_egress_bytes_total").increment(d.bytes_up + d.bytes_down);
            tracing::debug!(box_id = %d.box_id, host = %d.host, port = d.port, verdict, reason = %d.reason, "egress");
            decisions_engine.box_egress_decision(d);
        }
    });
    engine.load_tenant_budgets().await?;
    // The ledger writer: every metered request becomes a usage row.
    tokio::spawn(engine.clone().ledger_writer(metered));
    tokio::spawn(engine.clone().box_time_heartbeat());
    tokio::spawn(observe::sample_boxes(engine.clone()));
    tokio::spawn(engine::triggers::scheduler(engine.clone()));
    // Bound before joining the cluster: the advertised URL names the port really bound.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServerError::Listen(cfg.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Listen(cfg.listen, e))?;
    engine.join_cluster(cluster_config(&cfg, addr)).await?;
    engine.reconcile().await?;
    // After reconcile: a previous run's ready boxes are gone before new ones are made.
    engine.start_pools(cfg.pools.clone()).await;
    let state = AppState {
        engine: engine.clone(),
        metrics: observe::metrics_handle(),
    };
    let app = api::router(state.clone(), cfg.max_body_bytes);
    let started = Started {
        addr,
        admin_key_file,
        state: state.clone(),
    };
    let info = serde_json::json!({"url": format!("http://{addr}"), "pid": std::process::id()});
    let _ = std::fs::write(cfg.data_dir.join("server.json"), info.to_string());
    on_ready(&started);
    tracing::info!(%addr, "berth listening");
    // Stop sessions and boxes as soon as shutdown is asked for: that also ends the event
    // streams, which graceful shutdown would otherwise wait for forever.
    let eng = engine.clone();
    let stopping = async move {
        shutdown.await;
        tracing::info!("shutting down: stopping sessions and boxes");
        eng.shutdown().await;
    };
    listener::serve(listener, app, &cfg.listener, stopping).await;
    // Requests that finished while the connections drained are metered too.
    engine.ledger_sync().await;
    let _ = std::fs::remove_file(cfg.data_dir.join("server.json"));
    Ok(())
}

/// This node's part in the cluster, from the configuration and the address bound.
fn cluster_config(cfg: &Config, addr: SocketAddr) -> engine::nodes::ClusterConfig {
    let node_name = cfg
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(engine::nodes::host_name);
    let advertise_url = cfg.advertise_url.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            format!("http://{}:{}", engine::nodes::host_name(), addr.port())
        } else {
            format!("http://{addr}")
        }
    });
    let host = engine::admission::host_max_box();
    engine::nodes::ClusterConfig {
        node_name,
        advertise_url: advertise_url.trim_end_matches('/').to_string(),
        secret: cfg.cluster_secret.clone().filter(|s| !s.is_empty()),
        lease: std::time::Duration::from_millis(cfg.node_lease_ms.max(500)),
        capacity: berth_api::NodeCapacity {
            cpus: cfg.max_box.cpus.unwrap_or(host.cpus),
            memory_mib: cfg.max_box.memory_mib.unwrap_or(host.memory_mib),
            disk_mib: cfg.max_box.disk_mib.unwrap_or(host.disk_mib),
            boxes: 0,
        },
        labels: cfg.node_labels.clone(),
    }
}

fn box_connections(c: &config::BoxSocketsSection) -> berth_gateway::ConnLimits {
    berth_gateway::ConnLimits {
        max_connections: c.max_connections.max(1),
        header_timeout: std::time::Duration::from_secs(c.header_timeout_secs.max(1)),
        idle_timeout: std::time::Duration::from_secs(c.idle_timeout_secs.max(1)),
    }
}
